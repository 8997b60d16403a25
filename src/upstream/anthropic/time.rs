//! Anthropic's times are RFC 3339 strings (`2024-08-20T18:37:24.100435Z`);
//! Ferry compares them with its own unix seconds.

/// `s` (RFC 3339: a date, `T`, a time with optional fraction, and `Z` or a
/// `±HH:MM` offset) as whole unix seconds, or `None` when it is not one or
/// lies before 1970.
pub fn unix_secs(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // A leap second (:60) counts as the next second's start.
    if second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let hm = &rest[1..];
            if hm.len() != 5 || hm.as_bytes()[2] != b':' {
                return None;
            }
            let (h, m) = (hm[..2].parse::<i64>().ok()?, hm[3..].parse::<i64>().ok()?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_times_read_as_unix_seconds() {
        assert_eq!(unix_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            unix_secs("2024-08-20T18:37:24.100435Z"),
            Some(1_724_179_044)
        );
        assert_eq!(unix_secs("2026-11-30T01:03:37Z"), Some(1_796_000_617));
        assert_eq!(unix_secs("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        assert_eq!(unix_secs("2100-03-01T00:00:00Z"), Some(4_107_542_400));
        assert_eq!(unix_secs("2024-08-20T20:37:24+02:00"), Some(1_724_179_044));
        assert_eq!(
            unix_secs("2024-08-20T16:07:24.5-02:30"),
            Some(1_724_179_044)
        );
    }

    #[test]
    fn what_is_not_rfc_3339_is_none() {
        for bad in [
            "",
            "yesterday",
            "2024-08-20",
            "2024-08-20T18:37:24",
            "2024-13-20T18:37:24Z",
            "2024-08-20T18:37:24.Z",
            "2024-08-20T18:37:24+0200",
            "2024-08-20X18:37:24Z",
            "1969-12-31T23:59:59Z",
            "+024-08-20T18:37:24Z",
        ] {
            assert_eq!(unix_secs(bad), None, "{bad:?}");
        }
    }
}
