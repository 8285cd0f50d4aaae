//! Protection-group policy (MABS semantics) and the pure computations over it:
//! retention ([`retention`]), schedules ([`schedule`]) and the disk-space
//! projection ([`space`]).
//!
//! Everything here is a pure function of its arguments — no clock, no I/O, no
//! SQL. Times are **UTC** unix seconds: there is no time-zone or DST handling,
//! a day is exactly 86 400 seconds and "08:00" means 08:00 UTC.
//!
//! Parsers return one-line messages meant for the admin (the CLI prints them as
//! `error: …`, the API answers them with 400).

pub mod consistency;
pub mod retention;
pub mod schedule;
pub mod space;

use std::fmt;
use std::str::FromStr;

use tierback_format::wire::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Seconds in a (DST-free, UTC) day.
pub const DAY_SECS: i64 = 86_400;
/// Shortest synchronisation frequency, in minutes (MABS: 15 minutes).
pub const MIN_SYNC_MINUTES: u32 = 15;
/// Longest synchronisation frequency, in minutes (24 hours).
pub const MAX_SYNC_MINUTES: u32 = 24 * 60;
/// Short-term retention range bounds, in days (MABS: 1–448).
pub const MIN_RETENTION_DAYS: u32 = 1;
/// See [`MIN_RETENTION_DAYS`].
pub const MAX_RETENTION_DAYS: u32 = 448;
/// Most recovery-point times per day (one every 30 minutes).
pub const MAX_POINTS_PER_DAY: usize = 48;
/// Longest group name.
pub const MAX_GROUP_NAME: usize = 64;

/// A time of day in UTC, minute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    /// `hour:minute` UTC; `None` outside 00:00–23:59.
    pub fn new(hour: u32, minute: u32) -> Option<Self> {
        (hour < 24 && minute < 60).then(|| Self {
            minutes: (hour * 60 + minute) as u16,
        })
    }

    /// Minutes after midnight UTC.
    pub fn minutes(self) -> u32 {
        u32::from(self.minutes)
    }

    /// Seconds after midnight UTC.
    pub fn secs(self) -> i64 {
        i64::from(self.minutes) * 60
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.minutes / 60, self.minutes % 60)
    }
}

impl FromStr for TimeOfDay {
    type Err = String;

    /// `HH:MM` (24-hour clock, UTC); `H:MM` is accepted too.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("time {s:?} is not HH:MM (24-hour clock, UTC), e.g. 08:00");
        let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
        if h.is_empty() || h.len() > 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        TimeOfDay::new(h, m).ok_or_else(bad)
    }
}

/// How often a group's VMs are synchronised (an incremental backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFrequency {
    /// Every N minutes, on a grid that starts at 00:00 UTC each day.
    Every { minutes: u32 },
    /// No periodic synchronisation: an express full backup runs just before
    /// each recovery point (MABS "Just before a recovery point").
    JustBeforeRecoveryPoint,
}

impl SyncFrequency {
    /// Text used in flags, JSON and the catalog: `15m`, `2h`, `express-full`.
    pub fn as_text(self) -> String {
        match self {
            SyncFrequency::Every { minutes } if minutes % 60 == 0 => format!("{}h", minutes / 60),
            SyncFrequency::Every { minutes } => format!("{minutes}m"),
            SyncFrequency::JustBeforeRecoveryPoint => "express-full".into(),
        }
    }

    /// Minutes between synchronisations; `None` in express-full mode.
    pub fn minutes(self) -> Option<u32> {
        match self {
            SyncFrequency::Every { minutes } => Some(minutes),
            SyncFrequency::JustBeforeRecoveryPoint => None,
        }
    }

    /// From minutes (the catalog's representation); checks the range.
    pub fn from_minutes(minutes: Option<u32>) -> Result<Self, String> {
        let Some(minutes) = minutes else {
            return Ok(SyncFrequency::JustBeforeRecoveryPoint);
        };
        if !(MIN_SYNC_MINUTES..=MAX_SYNC_MINUTES).contains(&minutes)
            || minutes % MIN_SYNC_MINUTES != 0
        {
            return Err(format!(
                "synchronisation frequency {minutes} min must be a multiple of 15 min between 15m and 24h (or express-full)"
            ));
        }
        Ok(SyncFrequency::Every { minutes })
    }
}

impl FromStr for SyncFrequency {
    type Err = String;

    /// `15m`, `30m`, `1h`, `2h30m` … `24h`, or `express-full` /
    /// `just-before-recovery-point`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        if t == "express-full" || t == "just-before-recovery-point" {
            return Ok(SyncFrequency::JustBeforeRecoveryPoint);
        }
        let bad = || {
            format!("synchronisation frequency {s:?} is not like 15m, 1h, 2h30m or express-full")
        };
        let (hours, rest) = match t.split_once('h') {
            Some((h, rest)) => (h.parse::<u32>().map_err(|_| bad())?, rest),
            None => (0, t.as_str()),
        };
        let mins = match rest {
            "" => 0,
            r => r
                .strip_suffix('m')
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(bad)?,
        };
        if t.is_empty() || (rest.is_empty() && !t.contains('h')) {
            return Err(bad());
        }
        let total = hours
            .checked_mul(60)
            .and_then(|h| h.checked_add(mins))
            .ok_or_else(bad)?;
        SyncFrequency::from_minutes(Some(total))
    }
}

/// When a group's replicas are checked against their sources (MABS
/// consistency-check options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsistencyCheck {
    /// Only when a replica is found inconsistent (never on a schedule).
    OnlyWhenInconsistent,
    /// Every day at this time (UTC).
    Daily(TimeOfDay),
    /// Only when an admin runs `consistency-check`.
    Manual,
}

impl ConsistencyCheck {
    /// Mode name used in flags, JSON and the catalog.
    pub fn mode(self) -> &'static str {
        match self {
            ConsistencyCheck::OnlyWhenInconsistent => "only-when-inconsistent",
            ConsistencyCheck::Daily(_) => "scheduled",
            ConsistencyCheck::Manual => "manual",
        }
    }

    /// The daily time of a scheduled check.
    pub fn at(self) -> Option<TimeOfDay> {
        match self {
            ConsistencyCheck::Daily(t) => Some(t),
            _ => None,
        }
    }

    /// From a mode name and, for `scheduled`, its time.
    pub fn parse(mode: &str, at: Option<&str>) -> Result<Self, String> {
        match (mode.trim(), at) {
            ("only-when-inconsistent", None) => Ok(ConsistencyCheck::OnlyWhenInconsistent),
            ("manual", None) => Ok(ConsistencyCheck::Manual),
            ("scheduled", Some(t)) => Ok(ConsistencyCheck::Daily(t.parse()?)),
            ("scheduled", None) => Err(
                "a scheduled consistency check needs its time: --consistency-check-at HH:MM".into(),
            ),
            ("only-when-inconsistent" | "manual", Some(_)) => Err(format!(
                "--consistency-check-at only goes with --consistency-check scheduled, not {mode}"
            )),
            (other, _) => Err(format!(
                "consistency check {other:?} must be only-when-inconsistent, scheduled or manual"
            )),
        }
    }
}

/// A protection group's whole policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPolicy {
    pub sync: SyncFrequency,
    /// Recovery-point times of every day, sorted, distinct, at least one.
    pub points_at: Vec<TimeOfDay>,
    /// Short-term retention range on the local tier.
    pub retention: retention::RetentionPolicy,
    /// Chunk size of the group's backups (power of two, 256 KiB–8 MiB).
    pub chunk_size: u32,
    pub consistency_check: ConsistencyCheck,
}

impl Default for GroupPolicy {
    /// MABS-like defaults: sync every 15 minutes, one recovery point at 20:00,
    /// 5 days on disk, 1 MiB chunks, consistency check only when inconsistent.
    fn default() -> Self {
        Self {
            sync: SyncFrequency::Every { minutes: 15 },
            points_at: vec![TimeOfDay { minutes: 20 * 60 }],
            retention: retention::RetentionPolicy { short_term_days: 5 },
            chunk_size: tierback_format::wire::DEFAULT_CHUNK_SIZE,
            consistency_check: ConsistencyCheck::OnlyWhenInconsistent,
        }
    }
}

impl GroupPolicy {
    /// Checks every field; the first problem as one line.
    pub fn validate(&self) -> Result<(), String> {
        SyncFrequency::from_minutes(self.sync.minutes())?;
        validate_points(&self.points_at)?;
        validate_retention_days(self.retention.short_term_days)?;
        validate_chunk_size(self.chunk_size)?;
        Ok(())
    }
}

/// A group name: 1–64 characters of letters, digits, `-`, `_`, `.`.
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_GROUP_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "group name {name:?} must be 1–64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// `08:00,20:00` → sorted times; at least one, at most 48, no repeats.
pub fn parse_points_at(s: &str) -> Result<Vec<TimeOfDay>, String> {
    let mut v = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<Result<Vec<TimeOfDay>, String>>()?;
    v.sort();
    validate_points(&v)?;
    Ok(v)
}

fn validate_points(v: &[TimeOfDay]) -> Result<(), String> {
    if v.is_empty() {
        return Err(
            "at least one recovery-point time a day is needed, e.g. --points-at 20:00".into(),
        );
    }
    if v.len() > MAX_POINTS_PER_DAY {
        return Err(format!(
            "{} recovery-point times a day is more than the {MAX_POINTS_PER_DAY} allowed",
            v.len()
        ));
    }
    if let Some(w) = v.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!("recovery-point time {} is given twice", w[1]));
    }
    Ok(())
}

/// Short-term retention range: 1–448 days.
pub fn validate_retention_days(days: u32) -> Result<(), String> {
    if !(MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&days) {
        return Err(format!(
            "retention range {days} days must be between {MIN_RETENTION_DAYS} and {MAX_RETENTION_DAYS} days"
        ));
    }
    Ok(())
}

/// Chunk size: a power of two between 256 KiB and 8 MiB.
pub fn validate_chunk_size(bytes: u32) -> Result<(), String> {
    if !bytes.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&bytes) {
        return Err(format!(
            "chunk size {bytes} bytes must be a power of two between 256KiB and 8MiB"
        ));
    }
    Ok(())
}

/// `1MiB`, `256KiB`, `8MiB`, `512K`, `2M` or plain bytes; then validated.
pub fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let bad = || format!("chunk size {s:?} is not like 256KiB, 1MiB or 8MiB");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    let bytes = u32::try_from(bytes)
        .map_err(|_| format!("chunk size {s:?} must be a power of two between 256KiB and 8MiB"))?;
    validate_chunk_size(bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: u32, m: u32) -> TimeOfDay {
        TimeOfDay::new(h, m).expect("valid time")
    }

    #[test]
    fn time_of_day_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("08:00", Some("08:00")),
            ("8:05", Some("08:05")),
            ("00:00", Some("00:00")),
            ("23:59", Some("23:59")),
            ("24:00", None),
            ("12:60", None),
            ("12", None),
            ("12:5", None),
            ("ab:cd", None),
            ("", None),
            ("-1:00", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<TimeOfDay>().ok().map(|t| t.to_string());
            assert_eq!(got.as_deref(), *want, "input {input:?}");
        }
    }

    #[test]
    fn sync_frequency_table() {
        use SyncFrequency::*;
        let cases: &[(&str, Result<SyncFrequency, ()>)] = &[
            ("15m", Ok(Every { minutes: 15 })),
            ("30m", Ok(Every { minutes: 30 })),
            ("1h", Ok(Every { minutes: 60 })),
            ("7h", Ok(Every { minutes: 420 })),
            ("2h30m", Ok(Every { minutes: 150 })),
            ("24h", Ok(Every { minutes: 1440 })),
            ("express-full", Ok(JustBeforeRecoveryPoint)),
            ("just-before-recovery-point", Ok(JustBeforeRecoveryPoint)),
            ("10m", Err(())),
            ("20m", Err(())),
            ("25h", Err(())),
            ("0m", Err(())),
            ("15", Err(())),
            ("h", Err(())),
            ("", Err(())),
            ("1x", Err(())),
        ];
        for (input, want) in cases {
            let got = input.parse::<SyncFrequency>();
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{input}"),
                (Err(()), Err(msg)) => assert!(!msg.contains('\n'), "{input}: {msg}"),
                _ => panic!("{input}: got {got:?}"),
            }
        }
        for f in [
            Every { minutes: 15 },
            Every { minutes: 150 },
            Every { minutes: 120 },
        ] {
            assert_eq!(f.as_text().parse::<SyncFrequency>(), Ok(f));
        }
        assert_eq!(JustBeforeRecoveryPoint.as_text(), "express-full");
    }

    #[test]
    fn points_at_table() {
        let cases: &[(&str, Result<Vec<TimeOfDay>, &str>)] = &[
            ("08:00,20:00", Ok(vec![t(8, 0), t(20, 0)])),
            ("20:00,08:00", Ok(vec![t(8, 0), t(20, 0)])),
            ("00:00", Ok(vec![t(0, 0)])),
            ("", Err("at least one")),
            ("08:00,08:00", Err("given twice")),
            ("08:00,25:00", Err("not HH:MM")),
        ];
        for (input, want) in cases {
            match (parse_points_at(input), want) {
                (Ok(g), Ok(w)) => assert_eq!(&g, w, "{input}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{input}: {g}"),
                (g, _) => panic!("{input}: got {g:?}"),
            }
        }
        let many: Vec<String> = (0..49)
            .map(|i| format!("{:02}:{:02}", i / 2, (i % 2) * 29))
            .collect();
        assert!(parse_points_at(&many.join(",")).is_err());
    }

    #[test]
    fn chunk_size_and_retention_table() {
        let cases: &[(&str, Option<u32>)] = &[
            ("256KiB", Some(256 << 10)),
            ("1MiB", Some(1 << 20)),
            ("8MiB", Some(8 << 20)),
            ("2M", Some(2 << 20)),
            ("512k", Some(512 << 10)),
            ("1048576", Some(1 << 20)),
            ("128KiB", None),
            ("16MiB", None),
            ("3MiB", None),
            ("1GiB", None),
            ("99999999999MiB", None),
            ("MiB", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_chunk_size(input).ok(), *want, "{input}");
        }
        for (days, ok) in [(0, false), (1, true), (448, true), (449, false)] {
            assert_eq!(validate_retention_days(days).is_ok(), ok, "{days}");
        }
    }

    #[test]
    fn consistency_check_and_names() {
        use ConsistencyCheck::*;
        assert_eq!(ConsistencyCheck::parse("manual", None), Ok(Manual));
        assert_eq!(
            ConsistencyCheck::parse("only-when-inconsistent", None),
            Ok(OnlyWhenInconsistent)
        );
        assert_eq!(
            ConsistencyCheck::parse("scheduled", Some("02:30")),
            Ok(Daily(t(2, 30)))
        );
        assert!(ConsistencyCheck::parse("scheduled", None).is_err());
        assert!(ConsistencyCheck::parse("manual", Some("02:00")).is_err());
        assert!(ConsistencyCheck::parse("weekly", None).is_err());
        for (name, ok) in [
            ("web", true),
            ("sql-01.prod_A", true),
            ("", false),
            ("a b", false),
            ("x/y", false),
        ] {
            assert_eq!(validate_group_name(name).is_ok(), ok, "{name:?}");
        }
        assert!(validate_group_name(&"a".repeat(65)).is_err());
        assert_eq!(GroupPolicy::default().validate(), Ok(()));
    }
}
