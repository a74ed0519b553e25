//! Byte sizes as operators write them in config vars: `1048576`, `512KiB`,
//! `256MiB`, `1GiB` (also `K`/`M`/`G`, `KB`/`MB`/`GB`, all powers of 1024).

/// Parses a size in bytes; the error says what was wrong, for clap to show.
pub fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("not a size: {text:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use KiB, MiB or GiB)")),
    };
    number.checked_mul(1 << shift).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        for (text, want) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512KiB", 512 << 10),
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("2g", 2 << 30),
            (" 3 MB ", 3 << 20),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for bad in ["", "MiB", "-1", "1.5GiB", "10 parsecs", "99999999999999TiB"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
