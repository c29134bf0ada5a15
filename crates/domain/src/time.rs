//! UTC timestamps with millisecond precision, and CommCare's phone datetime grammar (R76).
//!
//! Phones send ISO 8601 with many shapes (`2026-03-02T09:15:22.104+03:00`, `2026-03-02`,
//! `2026-03-02 09:15`); everything is normalised to UTC milliseconds and printed as
//! `YYYY-MM-DDTHH:MM:SS.mmmZ` (R32). The calendar code is the proleptic Gregorian algorithm of
//! Howard Hinnant's `days_from_civil`, done in integers so it never panics.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

/// Why a datetime text was refused (the caller maps it to `PhoneDateValueError` or `CaseValueError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ISO 8601 date or datetime: {0:?}")]
pub struct DateError(pub String);

const MS_PER_DAY: i64 = 86_400_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// A tiny cursor over ASCII digits and separators.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<i64> {
        let part = self.s.get(self.i..self.i + n)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.i += n;
        Some(part.iter().fold(0, |acc, b| acc * 10 + i64::from(b - b'0')))
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn done(&self) -> bool {
        self.i == self.s.len()
    }
}

impl Timestamp {
    /// Serialises as the printed text (`YYYY-MM-DDTHH:MM:SS.mmmZ`) instead of milliseconds, for
    /// JSON views: `#[serde(serialize_with = "Timestamp::serialize_text")]`.
    ///
    /// # Errors
    /// Whatever the serializer returns.
    pub fn serialize_text<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From milliseconds since the epoch.
    pub fn from_unix_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub fn unix_millis(self) -> i64 {
        self.0
    }

    /// Builds a UTC timestamp from calendar fields; `None` when a field is out of range.
    pub fn from_parts(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, ms: i64) -> Option<Self> {
        let ok = (1..=9999).contains(&y)
            && (1..=12).contains(&mo)
            && d >= 1
            && d <= days_in_month(y, mo)
            && (0..24).contains(&h)
            && (0..60).contains(&mi)
            && (0..=60).contains(&s)
            && (0..1000).contains(&ms);
        ok.then(|| {
            Timestamp(days_from_civil(y, mo, d) * MS_PER_DAY + ((h * 60 + mi) * 60 + s) * 1000 + ms)
        })
    }

    /// Parses a phone datetime per R76: `YYYY-MM-DD`, optionally `T` or a space and
    /// `hh:mm[:ss[.fraction]]`, optionally `Z`, `±hh:mm`, `±hhmm` or `±hh`. No offset means UTC.
    /// Surrounding whitespace is ignored. Fractions beyond milliseconds are truncated.
    pub fn parse_phone(text: &str) -> Result<Timestamp, DateError> {
        Self::parse_inner(text.trim()).ok_or_else(|| DateError(text.to_owned()))
    }

    fn parse_inner(text: &str) -> Option<Timestamp> {
        let mut c = Cursor {
            s: text.as_bytes(),
            i: 0,
        };
        let y = c.digits(4)?;
        if !c.eat(b'-') {
            return None;
        }
        let mo = c.digits(2)?;
        if !c.eat(b'-') {
            return None;
        }
        let d = c.digits(2)?;
        if c.done() {
            return Timestamp::from_parts(y, mo, d, 0, 0, 0, 0);
        }
        if !(c.eat(b'T') || c.eat(b' ')) {
            return None;
        }
        let h = c.digits(2)?;
        if !c.eat(b':') {
            return None;
        }
        let mi = c.digits(2)?;
        let (mut s, mut ms) = (0, 0);
        if c.eat(b':') {
            s = c.digits(2)?;
            if c.eat(b'.') || c.eat(b',') {
                let start = c.i;
                let mut scale = 100;
                while let Some(b) = c.peek().filter(u8::is_ascii_digit) {
                    ms += i64::from(b - b'0') * scale;
                    scale /= 10;
                    c.i += 1;
                }
                if c.i == start {
                    return None;
                }
            }
        }
        let mut offset_min = 0;
        if c.eat(b'Z') {
        } else if let Some(sign @ (b'+' | b'-')) = c.peek() {
            c.i += 1;
            let oh = c.digits(2)?;
            let om = if c.eat(b':') {
                c.digits(2)?
            } else if c.done() {
                0
            } else {
                c.digits(2)?
            };
            if oh > 23 || om > 59 {
                return None;
            }
            offset_min = (oh * 60 + om) * if sign == b'-' { -1 } else { 1 };
        }
        if !c.done() {
            return None;
        }
        let local = Timestamp::from_parts(y, mo, d, h, mi, s.min(59), ms)?;
        Some(Timestamp(local.0 - offset_min * 60_000))
    }

    /// Parses an RFC 3339 timestamp (a strict subset of [`Timestamp::parse_phone`] that requires a
    /// time). Used for `--received-at`.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, DateError> {
        let t = text.trim();
        if t.len() < 16 || !matches!(t.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
            return Err(DateError(text.to_owned()));
        }
        Self::parse_phone(&t.replacen('t', "T", 1))
    }

    /// Calendar fields `(year, month, day, hour, minute, second, millisecond)` in UTC.
    pub fn parts(self) -> (i64, i64, i64, i64, i64, i64, i64) {
        let days = self.0.div_euclid(MS_PER_DAY);
        let rem = self.0.rem_euclid(MS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        (
            y,
            m,
            d,
            rem / 3_600_000,
            rem / 60_000 % 60,
            rem / 1000 % 60,
            rem % 1000,
        )
    }
}

impl fmt::Display for Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` (R32).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s, ms) = self.parts();
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Timestamp::parse_phone(s)
            .map(|t| t.to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn r76_accepted_shapes_normalise_to_utc() {
        assert_eq!(
            p("2026-03-02T09:15:22.104+03:00"),
            "2026-03-02T06:15:22.104Z"
        );
        assert_eq!(p("2026-03-02"), "2026-03-02T00:00:00.000Z");
        assert_eq!(p("2026-03-02 09:15"), "2026-03-02T09:15:00.000Z");
        assert_eq!(p("2026-03-02T09:15:22Z"), "2026-03-02T09:15:22.000Z");
        assert_eq!(
            p("2026-03-02T09:15:22.1234567-0530"),
            "2026-03-02T14:45:22.123Z"
        );
        assert_eq!(p("2026-03-02T01:00:00+02"), "2026-03-01T23:00:00.000Z");
        assert_eq!(p("2024-02-29T00:00:00"), "2024-02-29T00:00:00.000Z");
    }

    #[test]
    fn r76_rejects_the_url_decoded_plus_and_other_garbage() {
        for bad in [
            "2015-08-06T14:33:12.077 05:30",
            "2023-02-29",
            "2026-13-01",
            "yesterday",
            "",
            "2026-03-02T25:00",
            "2026-03-02T09:15:22.",
            "20260302",
        ] {
            assert!(Timestamp::parse_phone(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn round_trips_through_display_before_and_after_epoch() {
        for ms in [
            0,
            1,
            -1,
            1_767_225_600_123,
            -86_400_001,
            253_402_300_799_999,
        ] {
            let t = Timestamp(ms);
            assert_eq!(Timestamp::parse_phone(&t.to_string()), Ok(t));
        }
    }

    #[test]
    fn rfc3339_requires_a_time() {
        assert!(Timestamp::parse_rfc3339("2026-03-02").is_err());
        assert_eq!(
            Timestamp::parse_rfc3339("2026-03-02T00:00:00Z").map(|t| t.0),
            Ok(days_from_civil(2026, 3, 2) * MS_PER_DAY)
        );
    }
}
