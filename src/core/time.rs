//! Calendar arithmetic and the small amount of time text the filter has to read and write.
//!
//! Everything here is UTC and proleptic Gregorian, integer-only and independent of the
//! host clock: callers pass the instant they mean, so the functions are deterministic and
//! testable, and behave the same inside the wasm sandbox (which has no time-zone data).

use core::fmt;

/// Seconds in a (UTC, leap-second-free) day; unix time counts every day as this long.
pub const SECS_PER_DAY: i64 = 86_400;

/// Why a timestamp or a duration was rejected.
///
/// Configuration files and API payloads carry these strings; a precise reason lets an
/// operator fix the value instead of guessing which part was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeError {
    /// The text does not have the RFC 3339 shape; the message names the offending part.
    Syntax(&'static str),
    /// The fields are well formed but name a day that does not exist (Feb 30, month 13...).
    InvalidDate {
        /// Year as written.
        year: i64,
        /// Month as written (valid range 1..=12).
        month: u32,
        /// Day of month as written.
        day: u32,
    },
    /// The time of day does not exist (hour 24, minute 60, leap second 60...).
    InvalidTime {
        /// Hour as written (valid range 0..=23).
        hour: u32,
        /// Minute as written (valid range 0..=59).
        minute: u32,
        /// Second as written (valid range 0..=59).
        second: u32,
    },
    /// The numeric UTC offset is out of range (hours above 23 or minutes above 59).
    InvalidOffset {
        /// Offset hours as written.
        hours: u32,
        /// Offset minutes as written.
        minutes: u32,
    },
    /// A duration is empty, zero, negative, too large or malformed; the message says which.
    Duration(&'static str),
    /// A duration has a unit other than `ms`, `s`, `m`, `h` or `d`; carries the unit seen.
    UnknownUnit(String),
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const RFC3339_HINT: &str = "expected YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM|-HH:MM)";
        const DURATION_HINT: &str =
            "expected a positive integer followed by ms, s, m, h or d, e.g. 500ms, 90s, 24h, 7d";
        match self {
            TimeError::Syntax(what) => {
                write!(f, "invalid RFC 3339 timestamp: {what} ({RFC3339_HINT})")
            }
            TimeError::InvalidDate { year, month, day } => {
                if !(1..=12).contains(month) {
                    write!(f, "invalid date {year:04}-{month:02}-{day:02}: month must be 01 to 12")
                } else {
                    write!(
                        f,
                        "invalid date {year:04}-{month:02}-{day:02}: {year:04}-{month:02} has {} days",
                        days_in_month(*year, *month)
                    )
                }
            }
            TimeError::InvalidTime { hour, minute, second } => write!(
                f,
                "invalid time of day {hour:02}:{minute:02}:{second:02}: hour must be 00 to 23, \
                 minute and second 00 to 59 (leap seconds are not accepted)"
            ),
            TimeError::InvalidOffset { hours, minutes } => write!(
                f,
                "invalid UTC offset {hours:02}:{minutes:02}: hours must be 00 to 23, minutes 00 to 59"
            ),
            TimeError::Duration(what) => write!(f, "invalid duration: {what} ({DURATION_HINT})"),
            TimeError::UnknownUnit(unit) => {
                write!(f, "invalid duration: unknown unit {unit:?} ({DURATION_HINT})")
            }
        }
    }
}

impl std::error::Error for TimeError {}

/// Where long-running work reads the time: fixed for work that fits in one short
/// callback (and in tests), live (the host clock) for work that may run long enough
/// to outlast a lease it must renew, such as a million-key push.
#[derive(Clone, Copy)]
pub enum Clock<'a> {
    Fixed(u64),
    Live(&'a dyn Fn() -> u64),
}

impl Clock<'_> {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::Fixed(t) => *t,
            Clock::Live(f) => f(),
        }
    }
}

/// Whether `year` is a Gregorian leap year; needed to validate Feb 29 and size February.
pub fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Number of days in `month` (1..=12) of `year`, or 0 for a month outside 1..=12.
///
/// Used to reject impossible dates such as Feb 30 rather than silently normalising them.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (Howard Hinnant's
/// `days_from_civil`).
///
/// The calendar maths behind timestamps and calendar-aligned quota periods, without any
/// time-zone database. `m` must be 1..=12 and `d` 1..=31: other values are not rejected
/// and give unspecified (but never panicking) results. Computed in `i128`, so any `y`
/// works; the result saturates at the `i64` bounds.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let m = i128::from(m);
    let d = i128::from(d);
    let y = i128::from(y) - i128::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    let days = era * 146_097 + doe - 719_468;
    days.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The proleptic Gregorian `(year, month, day)` of `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`); the inverse of [`days_from_civil`].
///
/// Needed to find month boundaries and to print timestamps. Defined for every `i64`
/// (computed in `i128`, and the year of any `i64` day count fits in `i64`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = i128::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let y = y + i128::from(m <= 2);
    (y as i64, m, d)
}

/// Parses an RFC 3339 timestamp into unix seconds (UTC).
///
/// Key expiry dates and plan start dates arrive in this form. Accepted:
/// `YYYY-MM-DDTHH:MM:SS` followed by `Z` or a numeric offset `+HH:MM` / `-HH:MM`;
/// `t` and `z` may be lowercase; optional fractional seconds (`.` and one or more digits)
/// are truncated. Rejected with a specific [`TimeError`]: anything else (including
/// surrounding whitespace and a space instead of `T`), dates that do not exist (Feb 30,
/// month 13), hour 24, minute or second 60 (leap seconds), offsets beyond 23:59.
pub fn parse_rfc3339(s: &str) -> Result<i64, TimeError> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(TimeError::Syntax("too short"));
    }
    let year = digits(b, 0, 4, "year must be four digits")?;
    expect(b, 4, b'-', "expected '-' after the year")?;
    let month = digits(b, 5, 2, "month must be two digits")?;
    expect(b, 7, b'-', "expected '-' after the month")?;
    let day = digits(b, 8, 2, "day must be two digits")?;
    if !matches!(b[10], b'T' | b't') {
        return Err(TimeError::Syntax("expected 'T' between date and time"));
    }
    let hour = digits(b, 11, 2, "hour must be two digits")?;
    expect(b, 13, b':', "expected ':' after the hour")?;
    let minute = digits(b, 14, 2, "minute must be two digits")?;
    expect(b, 16, b':', "expected ':' after the minute")?;
    let second = digits(b, 17, 2, "second must be two digits")?;

    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(TimeError::Syntax("fractional seconds need at least one digit"));
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') => {
            if i + 1 != b.len() {
                return Err(TimeError::Syntax("unexpected text after 'Z'"));
            }
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            if b.len() != i + 6 {
                return Err(TimeError::Syntax("offset must be +HH:MM or -HH:MM"));
            }
            let oh = digits(b, i + 1, 2, "offset hours must be two digits")?;
            expect(b, i + 3, b':', "expected ':' in the offset")?;
            let om = digits(b, i + 4, 2, "offset minutes must be two digits")?;
            if oh > 23 || om > 59 {
                return Err(TimeError::InvalidOffset { hours: oh, minutes: om });
            }
            let magnitude = i64::from(oh) * 3600 + i64::from(om) * 60;
            if sign == b'+' {
                magnitude
            } else {
                -magnitude
            }
        }
        Some(_) => return Err(TimeError::Syntax("expected 'Z' or a numeric offset")),
        None => return Err(TimeError::Syntax("missing 'Z' or numeric offset")),
    };

    let year = i64::from(year);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(TimeError::InvalidDate { year, month, day });
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(TimeError::InvalidTime { hour, minute, second });
    }
    let local = days_from_civil(year, month, day) * SECS_PER_DAY
        + i64::from(hour) * 3600
        + i64::from(minute) * 60
        + i64::from(second);
    // Local time = UTC + offset, so UTC = local - offset.
    Ok(local - offset_secs)
}

/// Formats unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
///
/// Used in logs, admin output and error bodies so clients see one unambiguous form.
/// Years outside 0000..=9999 cannot be expressed in RFC 3339; they are still printed
/// (more digits, or a leading `-`) rather than clamped, so the output never lies.
pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(SECS_PER_DAY);
    let tod = secs.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Parses a configuration duration such as `500ms`, `90s`, `1m`, `24h`, `7d` into
/// milliseconds.
///
/// Rate-limit intervals and cache TTLs are written this way in the config. The form is a
/// run of ASCII digits directly followed by one lowercase unit: `ms`, `s`, `m`
/// (minutes), `h`, `d` (24 h). Rejected: empty input, zero, a sign, whitespace, a missing
/// or unknown unit, compound forms (`1h30m`), and values that overflow `u64`
/// milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, TimeError> {
    if s.is_empty() {
        return Err(TimeError::Duration("empty"));
    }
    if s.starts_with('-') {
        return Err(TimeError::Duration("negative durations are not allowed"));
    }
    let b = s.as_bytes();
    let n_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n_digits == 0 {
        return Err(TimeError::Duration("must start with a number"));
    }
    let unit = &s[n_digits..];
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(TimeError::Duration("missing unit")),
        other => return Err(TimeError::UnknownUnit(other.to_string())),
    };
    let mut value: u64 = 0;
    for &c in &b[..n_digits] {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or(TimeError::Duration("too large"))?;
    }
    if value == 0 {
        return Err(TimeError::Duration("must be greater than zero"));
    }
    value.checked_mul(unit_ms).ok_or(TimeError::Duration("too large"))
}

/// Reads `len` ASCII digits at `at` as a number, or fails with `what`.
fn digits(b: &[u8], at: usize, len: usize, what: &'static str) -> Result<u32, TimeError> {
    let field = b.get(at..at + len).ok_or(TimeError::Syntax(what))?;
    let mut v = 0u32;
    for &c in field {
        if !c.is_ascii_digit() {
            return Err(TimeError::Syntax(what));
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Ok(v)
}

/// Requires byte `c` at `at`, or fails with `what`.
fn expect(b: &[u8], at: usize, c: u8, what: &'static str) -> Result<(), TimeError> {
    if b.get(at) == Some(&c) {
        Ok(())
    } else {
        Err(TimeError::Syntax(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_known_points() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1970, 1, 2), 1);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(2024, 3, 1), 19_783);
        assert_eq!(days_from_civil(1600, 1, 1), -135_140);
        assert_eq!(days_from_civil(0, 3, 1), -719_468);
        assert_eq!(days_from_civil(0, 1, 1), -719_528);
        assert_eq!(days_from_civil(-1, 12, 31), -719_529);
    }

    #[test]
    fn civil_from_days_known_points() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
        assert_eq!(civil_from_days(-719_529), (-1, 12, 31));
        // 2100 is not a leap year: Feb 28 is followed by Mar 1.
        let feb28 = days_from_civil(2100, 2, 28);
        assert_eq!(civil_from_days(feb28 + 1), (2100, 3, 1));
    }

    #[test]
    fn civil_round_trip_over_many_centuries() {
        // Every day from 1599-12-01 to ~2500, walking the calendar by hand in parallel.
        let (mut y, mut m, mut d) = (1599i64, 12u32, 1u32);
        let start = days_from_civil(y, m, d);
        for days in start..start + 330_000 {
            assert_eq!(days_from_civil(y, m, d), days);
            assert_eq!(civil_from_days(days), (y, m, d));
            d += 1;
            if d > days_in_month(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn civil_extremes_do_not_panic() {
        for days in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            let _ = days_from_civil(y, m, d);
        }
        assert_eq!(days_from_civil(i64::MAX, 12, 31), i64::MAX);
        assert_eq!(days_from_civil(i64::MIN, 1, 1), i64::MIN);
    }

    #[test]
    fn leap_years() {
        assert!(is_leap_year(2000));
        assert!(is_leap_year(2024));
        assert!(!is_leap_year(2100));
        assert!(!is_leap_year(2023));
        assert!(is_leap_year(-4));
        assert!(is_leap_year(0));
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2023, 4), 30);
        assert_eq!(days_in_month(2023, 13), 0);
    }

    #[test]
    fn parse_basic_utc() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56Z"), Ok(1_709_210_096));
        assert_eq!(parse_rfc3339("2038-01-19T03:14:07Z"), Ok(2_147_483_647));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Ok(-1));
        assert_eq!(parse_rfc3339("0000-01-01T00:00:00Z"), Ok(-62_167_219_200));
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Ok(253_402_300_799));
    }

    #[test]
    fn parse_lowercase_and_fraction() {
        assert_eq!(parse_rfc3339("2024-02-29t12:34:56z"), Ok(1_709_210_096));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.999999999Z"), Ok(1_709_210_096));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.5z"), Ok(1_709_210_096));
        // Truncation also for times before the epoch (toward the earlier written second).
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.9Z"), Ok(-1));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.123+01:00"), Ok(1_709_210_096 - 3600));
    }

    #[test]
    fn parse_offsets() {
        // 12:00+02:00 is 10:00Z; 12:00-05:30 is 17:30Z.
        let noon = parse_rfc3339("2024-06-01T12:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2024-06-01T12:00:00+02:00"), Ok(noon - 7200));
        assert_eq!(parse_rfc3339("2024-06-01T12:00:00-05:30"), Ok(noon + 19_800));
        assert_eq!(parse_rfc3339("2024-06-01T12:00:00+00:00"), Ok(noon));
        assert_eq!(parse_rfc3339("2024-06-01T12:00:00-00:00"), Ok(noon));
        // Offsets can move the instant across a day, month and year boundary.
        assert_eq!(
            parse_rfc3339("2025-01-01T01:00:00+02:00"),
            parse_rfc3339("2024-12-31T23:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2024-12-31T22:00:00-03:00"),
            parse_rfc3339("2025-01-01T01:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00+23:59"),
            Ok(parse_rfc3339("2024-01-01T00:00:00Z").unwrap() - 86_340)
        );
    }

    #[test]
    fn parse_rejects_invalid_dates_and_times() {
        let date = |year, month, day| Err(TimeError::InvalidDate { year, month, day });
        assert_eq!(parse_rfc3339("2023-02-29T00:00:00Z"), date(2023, 2, 29));
        assert_eq!(parse_rfc3339("2024-02-30T00:00:00Z"), date(2024, 2, 30));
        assert_eq!(parse_rfc3339("2100-02-29T00:00:00Z"), date(2100, 2, 29));
        assert!(parse_rfc3339("2000-02-29T00:00:00Z").is_ok());
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), date(2024, 13, 1));
        assert_eq!(parse_rfc3339("2024-00-01T00:00:00Z"), date(2024, 0, 1));
        assert_eq!(parse_rfc3339("2024-04-31T00:00:00Z"), date(2024, 4, 31));
        assert_eq!(parse_rfc3339("2024-01-00T00:00:00Z"), date(2024, 1, 0));
        let time = |hour, minute, second| Err(TimeError::InvalidTime { hour, minute, second });
        assert_eq!(parse_rfc3339("2024-01-01T24:00:00Z"), time(24, 0, 0));
        assert_eq!(parse_rfc3339("2024-01-01T23:60:00Z"), time(23, 60, 0));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), time(23, 59, 60));
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00+24:00"),
            Err(TimeError::InvalidOffset { hours: 24, minutes: 0 })
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00-01:60"),
            Err(TimeError::InvalidOffset { hours: 1, minutes: 60 })
        );
    }

    #[test]
    fn parse_rejects_bad_syntax() {
        for bad in [
            "",
            "2024-01-01",
            "2024-01-01T00:00:00",
            "2024-01-01 00:00:00Z",
            "2024-01-01T00:00Z",
            "24-01-01T00:00:00Z",
            "2024/01/01T00:00:00Z",
            "2024-1-01T00:00:00Z",
            "2024-01-01T0:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00ZZ",
            "2024-01-01T00:00:00Z ",
            " 2024-01-01T00:00:00Z",
            "2024-01-01T00:00:00+0200",
            "2024-01-01T00:00:00+02",
            "2024-01-01T00:00:00+02:00:00",
            "2024-01-01T00:00:00UTC",
            "+2024-01-01T00:00:00Z",
            "2024-01-01T00:00:00.12a3Z",
            "２０２4-01-01T00:00:00Z",
            "2024-01-01T00:00:0éZ",
        ] {
            match parse_rfc3339(bad) {
                Err(TimeError::Syntax(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn error_messages_are_specific() {
        assert_eq!(
            parse_rfc3339("2023-02-29T00:00:00Z").unwrap_err().to_string(),
            "invalid date 2023-02-29: 2023-02 has 28 days"
        );
        assert_eq!(
            parse_rfc3339("2024-13-01T00:00:00Z").unwrap_err().to_string(),
            "invalid date 2024-13-01: month must be 01 to 12"
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T24:00:00Z").unwrap_err().to_string(),
            "invalid time of day 24:00:00: hour must be 00 to 23, minute and second 00 to 59 \
             (leap seconds are not accepted)"
        );
        assert_eq!(
            parse_rfc3339("2024-01-01 00:00:00Z").unwrap_err().to_string(),
            "invalid RFC 3339 timestamp: expected 'T' between date and time \
             (expected YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM|-HH:MM))"
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00+25:00").unwrap_err().to_string(),
            "invalid UTC offset 25:00: hours must be 00 to 23, minutes 00 to 59"
        );
        assert_eq!(
            parse_duration("5w").unwrap_err().to_string(),
            "invalid duration: unknown unit \"w\" (expected a positive integer followed by \
             ms, s, m, h or d, e.g. 500ms, 90s, 24h, 7d)"
        );
        assert_eq!(
            parse_duration("0s").unwrap_err().to_string(),
            "invalid duration: must be greater than zero (expected a positive integer \
             followed by ms, s, m, h or d, e.g. 500ms, 90s, 24h, 7d)"
        );
    }

    #[test]
    fn format_known_points() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(format_rfc3339(2_147_483_647), "2038-01-19T03:14:07Z");
        assert_eq!(format_rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(-62_167_219_200), "0000-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(253_402_300_800), "10000-01-01T00:00:00Z");
        // Never panics, even at the extremes.
        assert!(format_rfc3339(i64::MIN).ends_with('Z'));
        assert!(format_rfc3339(i64::MAX).ends_with('Z'));
    }

    #[test]
    fn format_parse_round_trip() {
        let mut t = -62_167_219_200i64; // 0000-01-01
        while t <= 253_402_300_799 {
            let s = format_rfc3339(t);
            assert_eq!(parse_rfc3339(&s), Ok(t), "{s}");
            t += 7_777_777; // ~90 days with a drifting time of day
        }
    }

    #[test]
    fn duration_forms() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("1ms"), Ok(1));
        assert_eq!(parse_duration("1s"), Ok(1_000));
        assert_eq!(parse_duration("90s"), Ok(90_000));
        assert_eq!(parse_duration("1m"), Ok(60_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert_eq!(parse_duration("24h"), Ok(86_400_000));
        assert_eq!(parse_duration("1d"), Ok(86_400_000));
        assert_eq!(parse_duration("7d"), Ok(604_800_000));
        assert_eq!(parse_duration("007s"), Ok(7_000));
        assert_eq!(parse_duration("18446744073709551615ms"), Ok(18_446_744_073_709_551_615));
        assert_eq!(parse_duration("213503982334d"), Ok(213_503_982_334 * 86_400_000));
    }

    #[test]
    fn duration_rejections() {
        let reason = |s: &str| match parse_duration(s) {
            Err(TimeError::Duration(r)) => r,
            other => panic!("{s:?} gave {other:?}"),
        };
        assert_eq!(reason(""), "empty");
        assert_eq!(reason("0s"), "must be greater than zero");
        assert_eq!(reason("0ms"), "must be greater than zero");
        assert_eq!(reason("-1s"), "negative durations are not allowed");
        assert_eq!(reason("+1s"), "must start with a number");
        assert_eq!(reason(" 1s"), "must start with a number");
        assert_eq!(reason("s"), "must start with a number");
        assert_eq!(reason("10"), "missing unit");
        assert_eq!(reason("18446744073709551616ms"), "too large");
        assert_eq!(reason("99999999999999999999999s"), "too large");
        assert_eq!(reason("213503982335d"), "too large");
        assert_eq!(reason("18446744073709552s"), "too large");
        let unknown = |s: &str| match parse_duration(s) {
            Err(TimeError::UnknownUnit(u)) => u,
            other => panic!("{s:?} gave {other:?}"),
        };
        assert_eq!(unknown("5w"), "w");
        assert_eq!(unknown("1.5s"), ".5s");
        assert_eq!(unknown("1h30m"), "h30m");
        assert_eq!(unknown("1 s"), " s");
        assert_eq!(unknown("1S"), "S");
        assert_eq!(unknown("1sec"), "sec");
        assert_eq!(unknown("1s "), "s ");
        assert_eq!(unknown("1µs"), "µs");
    }
}
