//! `spread`: a TCP router that sends each new connection to a random one of
//! several gateway instances, as Heroku's router does with web dynos.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use anyhow::Context;

pub async fn run(listen: &str, to: &str) -> anyhow::Result<()> {
    let targets: Vec<SocketAddr> = to
        .split(',')
        .map(|t| t.trim().parse().with_context(|| format!("bad address {t}")))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!targets.is_empty(), "--to needs at least one host:port");
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    println!("spreading http://{} over {} instances", listener.local_addr()?, targets.len());
    let random = std::collections::hash_map::RandomState::new();
    for count in 0u64.. {
        let (mut inbound, _) = listener.accept().await?;
        let mut hasher = random.build_hasher();
        hasher.write_u64(count);
        let target = targets[(hasher.finish() % targets.len() as u64) as usize];
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
    Ok(())
}
