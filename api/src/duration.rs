//! Durations as operators write them: `150ms`, `10s`, `5m`, `24h`, and the
//! Gateway API form that chains units (`1h30m`, `2s500ms`).

use std::time::Duration;

/// Parses a duration of one or more `<digits><unit>` parts, unit one of
/// `ms`, `s`, `m`, `h`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
        if digits == 0 {
            return Err(format!("bad duration {s:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(format!("duration {s:?}: unit must be ms, s, m or h")),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn durations() {
        assert_eq!(parse("24h").unwrap().as_secs(), 86400);
        assert_eq!(parse("150ms").unwrap().as_millis(), 150);
        assert_eq!(parse("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse("2s500ms").unwrap().as_millis(), 2500);
        assert!(parse("10").is_err());
        assert!(parse("5d").is_err());
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
    }
}
