//! Connection caps: how many connections may be open at once, in all and
//! from one client address, with a reserve kept for `/healthz` and runners
//! dialing back to `/rendezvous`.
//!
//! A connection is admitted as [`Place::Normal`] while both counts are under
//! their caps; past a cap, a small reserve ([`reserve`]) still admits it as
//! [`Place::Reserve`] (only the reserved paths are served on it, one request
//! per connection); past the reserve it is refused. The path is only known
//! once a request head has arrived, so the reserve is a count of
//! connections, not of requests: an attacker can hold reserve places too,
//! but only for the header read timeout, since nothing on them is kept alive.
//!
//! The counts live in one `std` mutex: it is taken twice per connection
//! (open and close), never per request and never across an `.await`, and the
//! per-address count and the total must move together, which one lock makes
//! plain. Addresses are grouped the way one client holds them: an IPv4
//! address (IPv4-mapped IPv6 included) on its own, IPv6 by /64.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The soft caps; each also gets a [`reserve`] above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub total: usize,
    pub per_ip: usize,
}

/// Where a new connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Under both caps: served like any connection.
    Normal,
    /// Over a cap but inside its reserve: only reserved paths are served.
    Reserve,
    /// Over a cap and its reserve: closed at once.
    Refuse,
}

/// Places admitted above a cap of `cap` for the reserved paths: an eighth,
/// at least 8, so a probe and a few runners get in even with tiny caps.
pub fn reserve(cap: usize) -> usize {
    (cap / 8).max(8)
}

impl Caps {
    /// Where a connection goes when `total` connections are open, `from_ip`
    /// of them from its client.
    pub fn place(self, total: usize, from_ip: usize) -> Place {
        if total >= self.total + reserve(self.total) || from_ip >= self.per_ip + reserve(self.per_ip) {
            Place::Refuse
        } else if total >= self.total || from_ip >= self.per_ip {
            Place::Reserve
        } else {
            Place::Normal
        }
    }

    /// The most connections the caps can admit at once, reserves included.
    pub fn most(self) -> usize {
        self.total + reserve(self.total)
    }
}

/// The open connections, counted. Cheap to clone.
#[derive(Clone)]
pub struct Connections(Arc<Inner>);

struct Inner {
    caps: Caps,
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// One admitted connection's place in the counts, given back when dropped
/// (when the connection task ends, however it ends).
pub struct Slot {
    connections: Connections,
    client: IpAddr,
    pub place: Place,
}

impl Connections {
    pub fn new(caps: Caps) -> Self {
        Connections(Arc::new(Inner { caps, open: Mutex::new(Counts::default()) }))
    }

    /// Counts a new connection from `ip`, or `None` when it must be refused.
    pub fn admit(&self, ip: IpAddr) -> Option<Slot> {
        let client = client_of(ip);
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        let from_client = open.by_client.get(&client).copied().unwrap_or(0);
        let place = self.0.caps.place(open.total, from_client);
        if place == Place::Refuse {
            return None;
        }
        open.total += 1;
        *open.by_client.entry(client).or_insert(0) += 1;
        drop(open);
        Some(Slot { connections: self.clone(), client, place })
    }

    /// Connections open now, in all.
    pub fn open(&self) -> usize {
        self.0.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.0.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(count) = open.by_client.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                // Forgotten at zero, so the map is as large as the clients
                // connected now, not every client ever seen.
                open.by_client.remove(&self.client);
            }
        }
    }
}

/// The key one client's connections are counted under: an IPv6 client
/// usually holds a whole /64, so that is what counts as one client.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_follow_the_caps_and_their_reserves() {
        let caps = Caps { total: 100, per_ip: 10 };
        // (open in all, open from this client, place); reserves: 12 above
        // 100, 8 above 10.
        let cases = [
            (0, 0, Place::Normal),
            (99, 9, Place::Normal),
            (100, 0, Place::Reserve),
            (50, 10, Place::Reserve),
            (111, 17, Place::Reserve),
            (112, 0, Place::Refuse),
            (50, 18, Place::Refuse),
            (500, 500, Place::Refuse),
        ];
        for (total, from_ip, place) in cases {
            assert_eq!(caps.place(total, from_ip), place, "{total} open, {from_ip} from the client");
        }
        assert_eq!(caps.most(), 112);
    }

    #[test]
    fn the_reserve_is_an_eighth_and_at_least_eight() {
        for (cap, reserved) in [(0, 8), (1, 8), (64, 8), (72, 9), (1024, 128)] {
            assert_eq!(reserve(cap), reserved, "cap {cap}");
        }
    }

    #[test]
    fn slots_count_per_client_and_give_their_place_back() {
        let connections = Connections::new(Caps { total: 100, per_ip: 2 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = connections.admit(a).unwrap();
        let second = connections.admit(a).unwrap();
        assert_eq!((first.place, second.place), (Place::Normal, Place::Normal));
        let reserved: Vec<Slot> = (0..8).map(|_| connections.admit(a).unwrap()).collect();
        assert!(reserved.iter().all(|s| s.place == Place::Reserve));
        assert!(connections.admit(a).is_none(), "past the reserve");
        assert_eq!(connections.admit(b).unwrap().place, Place::Normal, "another client is unaffected");
        assert_eq!(connections.open(), 10);
        drop(reserved);
        drop(first);
        assert_eq!(connections.admit(a).unwrap().place, Place::Normal, "a dropped slot is free again");
        drop(second);
        assert_eq!(connections.open(), 0);
        assert!(connections.0.open.lock().unwrap().by_client.is_empty());
    }

    #[test]
    fn the_total_cap_counts_every_client() {
        let connections = Connections::new(Caps { total: 3, per_ip: 100 });
        let slots: Vec<Slot> = (1..=3).map(|i| connections.admit(IpAddr::from([10, 0, 0, i])).unwrap()).collect();
        assert!(slots.iter().all(|s| s.place == Place::Normal));
        assert_eq!(connections.admit("10.0.0.9".parse().unwrap()).unwrap().place, Place::Reserve);
    }

    #[test]
    fn clients_are_grouped_by_address_and_ipv6_by_64() {
        let cases = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
            ("::1", "::"),
        ];
        for (ip, client) in cases {
            assert_eq!(client_of(ip.parse().unwrap()), client.parse::<IpAddr>().unwrap(), "{ip}");
        }
    }
}
