//! Schedules of a protection group: when the next synchronisation, recovery
//! point and consistency check are, what is due now, and which windows were
//! missed (passed with no run) — pure arithmetic on UTC unix seconds.
//!
//! # Model
//!
//! * **Windows** are instants on a daily grid in UTC (no DST: every day is
//!   86 400 s). Synchronisation windows are `00:00 + k × frequency` for every
//!   `k` that stays inside the day, so a frequency that does not divide the
//!   day restarts at midnight (7h → 00:00, 07:00, 14:00, 21:00, 00:00, …).
//!   Recovery-point windows are the group's `points_at` times; a scheduled
//!   consistency check has one window a day.
//! * A **synchronisation** is an incremental backup; a **recovery-point run**
//!   is an express full backup (full read, only changed chunks stored). A
//!   recovery-point run also counts as a synchronisation. In express-full mode
//!   there are no synchronisation windows: the sync happens just before (as
//!   part of) each recovery point, so `next_sync == next_recovery_point`.
//! * `LastRuns` holds when the runs of each kind were last *started* (the
//!   scheduler records the instant it enqueued them). Windows at or before
//!   `max(last run, since)` are settled. Of the unsettled windows in
//!   `(settled, now]`, the newest is **due** (run it now) and every older one
//!   is **missed**: reported, never silently skipped, never run late one by
//!   one (one catch-up run covers them). The list of missed windows is bounded
//!   by [`MAX_MISSED`] (the newest ones), with the exact total alongside.

use super::{ConsistencyCheck, GroupPolicy, SyncFrequency, DAY_SECS};

/// Most missed windows listed by [`plan`] (the total is always exact).
pub const MAX_MISSED: usize = 64;

/// Kind of a scheduled run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunKind {
    /// Incremental backup at a synchronisation window.
    Sync,
    /// Express full backup at a recovery-point window.
    RecoveryPoint,
    /// Consistency check at its daily window.
    ConsistencyCheck,
}

impl RunKind {
    /// Name used in JSON and job rows.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Sync => "sync",
            RunKind::RecoveryPoint => "recovery-point",
            RunKind::ConsistencyCheck => "consistency-check",
        }
    }
}

/// When runs of each kind last started (unix seconds, UTC); `None` = never.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastRuns {
    pub sync: Option<i64>,
    pub recovery_point: Option<i64>,
    pub consistency_check: Option<i64>,
}

/// A window that passed with no run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    /// Unix seconds (UTC) of the window.
    pub at: i64,
    pub kind: RunKind,
}

/// A backup to start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueBackup {
    /// `Sync` (incremental) or `RecoveryPoint` (express full).
    pub kind: RunKind,
    /// The window it serves (the newest unsettled one of its kind).
    pub window: i64,
    /// Whether it is a full backup (every recovery-point run is).
    pub full: bool,
}

/// Everything the scheduler needs about one group (or one member) at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// First synchronisation window after `now` (in express-full mode: the
    /// next recovery point, which includes the sync).
    pub next_sync: i64,
    /// First recovery-point window after `now`.
    pub next_recovery_point: i64,
    /// First consistency-check window after `now`; `None` unless scheduled.
    pub next_consistency_check: Option<i64>,
    /// The backup to start now, if a window is due.
    pub due_backup: Option<DueBackup>,
    /// The consistency-check window due now, if any.
    pub due_consistency_check: Option<i64>,
    /// Missed windows, oldest first, at most [`MAX_MISSED`] (the newest).
    pub missed: Vec<Window>,
    /// Number of missed windows in all (≥ `missed.len()`).
    pub missed_total: u64,
}

/// Seconds after midnight (UTC) of the synchronisation windows; empty in
/// express-full mode.
pub fn sync_offsets(sync: SyncFrequency) -> Vec<i64> {
    match sync.minutes() {
        Some(m) if m > 0 => {
            let step = i64::from(m) * 60;
            (0..)
                .map(|k| k * step)
                .take_while(|&o| o < DAY_SECS)
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Seconds after midnight (UTC) of the recovery-point windows, sorted.
pub fn point_offsets(policy: &GroupPolicy) -> Vec<i64> {
    let mut v: Vec<i64> = policy.points_at.iter().map(|t| t.secs()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// First window strictly after `t`; `None` when there are no windows.
pub fn next_after(offsets: &[i64], t: i64) -> Option<i64> {
    let (day, sod) = (t.div_euclid(DAY_SECS), t.rem_euclid(DAY_SECS));
    match offsets.iter().find(|&&o| o > sod) {
        Some(o) => Some(day * DAY_SECS + o),
        None => offsets.first().map(|o| (day + 1) * DAY_SECS + o),
    }
}

/// Last window at or before `t`; `None` when there are no windows.
pub fn latest_at_or_before(offsets: &[i64], t: i64) -> Option<i64> {
    let (day, sod) = (t.div_euclid(DAY_SECS), t.rem_euclid(DAY_SECS));
    match offsets.iter().rev().find(|&&o| o <= sod) {
        Some(o) => Some(day * DAY_SECS + o),
        None => offsets.last().map(|o| (day - 1) * DAY_SECS + o),
    }
}

/// Number of windows in `(after, upto]`, without enumerating them.
pub fn count_between(offsets: &[i64], after: i64, upto: i64) -> u64 {
    let upto_count = |t: i64| -> i128 {
        let (day, sod) = (t.div_euclid(DAY_SECS), t.rem_euclid(DAY_SECS));
        i128::from(day) * offsets.len() as i128
            + offsets.iter().filter(|&&o| o <= sod).count() as i128
    };
    if upto <= after {
        return 0;
    }
    u64::try_from(upto_count(upto) - upto_count(after)).unwrap_or(0)
}

/// Newest windows in `(after, upto]`, newest first, at most `limit`.
pub fn windows_between(offsets: &[i64], after: i64, upto: i64, limit: usize) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = latest_at_or_before(offsets, upto);
    while let Some(w) = cur {
        if w <= after || out.len() >= limit {
            break;
        }
        out.push(w);
        cur = latest_at_or_before(offsets, w - 1);
    }
    out
}

/// Unsettled windows of one kind: the due one and the missed ones.
struct Unsettled {
    due: Option<i64>,
    missed: Vec<i64>,
    missed_total: u64,
}

fn unsettled(offsets: &[i64], settled: i64, now: i64) -> Unsettled {
    let total = count_between(offsets, settled, now);
    let mut newest = windows_between(offsets, settled, now, MAX_MISSED + 1);
    let due = (!newest.is_empty()).then(|| newest.remove(0));
    Unsettled {
        due,
        missed: newest,
        missed_total: total.saturating_sub(1),
    }
}

/// The group's schedule at `now`. `since` is when the schedule began to apply
/// (the group's creation or the VM's joining it): windows at or before it are
/// never due nor missed.
pub fn plan(policy: &GroupPolicy, since: i64, last: &LastRuns, now: i64) -> Plan {
    let points = point_offsets(policy);
    let syncs = sync_offsets(policy.sync);
    let settled_point = last.recovery_point.unwrap_or(since).max(since);
    // A recovery-point run (express full) also synchronises.
    let settled_sync = last.sync.unwrap_or(since).max(settled_point);

    let p = unsettled(&points, settled_point, now);
    let s = unsettled(&syncs, settled_sync, now);

    let next_recovery_point = next_after(&points, now).unwrap_or(i64::MAX);
    let next_sync = next_after(&syncs, now).unwrap_or(next_recovery_point);

    let due_backup = match (p.due, s.due) {
        (Some(w), _) => Some(DueBackup {
            kind: RunKind::RecoveryPoint,
            window: w,
            full: true,
        }),
        (None, Some(w)) => Some(DueBackup {
            kind: RunKind::Sync,
            window: w,
            full: false,
        }),
        (None, None) => None,
    };

    let mut missed: Vec<Window> = Vec::new();
    let mut missed_total = p.missed_total + s.missed_total;
    let tag = |v: Vec<i64>, kind| v.into_iter().map(move |at| Window { at, kind });
    missed.extend(tag(p.missed, RunKind::RecoveryPoint));
    missed.extend(tag(s.missed, RunKind::Sync));

    let (next_consistency_check, due_consistency_check) = match policy.consistency_check {
        ConsistencyCheck::Daily(t) => {
            let offs = [t.secs()];
            let settled = last.consistency_check.unwrap_or(since).max(since);
            let c = unsettled(&offs, settled, now);
            missed_total += c.missed_total;
            missed.extend(tag(c.missed, RunKind::ConsistencyCheck));
            (next_after(&offs, now), c.due)
        }
        ConsistencyCheck::OnlyWhenInconsistent | ConsistencyCheck::Manual => (None, None),
    };

    missed.sort();
    if missed.len() > MAX_MISSED {
        missed.drain(..missed.len() - MAX_MISSED);
    }
    Plan {
        next_sync,
        next_recovery_point,
        next_consistency_check,
        due_backup,
        due_consistency_check,
        missed,
        missed_total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{retention::RetentionPolicy, TimeOfDay};

    /// 2026-01-01T00:00:00Z, a Thursday.
    const D0: i64 = 1_767_225_600;

    /// Day `d` after D0 at hh:mm.
    fn at(d: i64, hh: i64, mm: i64) -> i64 {
        D0 + d * DAY_SECS + hh * 3600 + mm * 60
    }

    fn pol(sync: &str, points: &str, cc: ConsistencyCheck) -> GroupPolicy {
        GroupPolicy {
            sync: sync.parse().expect("sync"),
            points_at: crate::policy::parse_points_at(points).expect("points"),
            retention: RetentionPolicy { short_term_days: 5 },
            chunk_size: 1 << 20,
            consistency_check: cc,
        }
    }

    fn tod(s: &str) -> TimeOfDay {
        s.parse().expect("time")
    }

    #[test]
    fn window_arithmetic_table() {
        let offs = [0, 7 * 3600, 14 * 3600, 21 * 3600]; // 7h grid
                                                        // (t, next_after, latest_at_or_before)
        let cases = [
            (at(0, 0, 0), at(0, 7, 0), at(0, 0, 0)),
            (at(0, 6, 59), at(0, 7, 0), at(0, 0, 0)),
            (at(0, 21, 0), at(1, 0, 0), at(0, 21, 0)),
            (at(0, 23, 59), at(1, 0, 0), at(0, 21, 0)),
            (at(-1, 22, 0), at(0, 0, 0), at(-1, 21, 0)),
            (-1, 0, -3 * 3600), // just before the epoch
        ];
        for (t, next, latest) in cases {
            assert_eq!(next_after(&offs, t), Some(next), "next_after({t})");
            assert_eq!(latest_at_or_before(&offs, t), Some(latest), "latest({t})");
        }
        assert_eq!(next_after(&[], 5), None);
        assert_eq!(latest_at_or_before(&[], 5), None);
        // count_between agrees with enumeration.
        for (a, b) in [
            (at(0, 0, 0), at(0, 0, 0)),
            (at(0, 0, 0), at(0, 7, 0)),
            (at(0, 0, 0) - 1, at(0, 7, 0)),
            (at(0, 3, 0), at(3, 22, 0)),
            (at(3, 22, 0), at(0, 3, 0)),
        ] {
            let n = windows_between(&offs, a, b, usize::MAX).len() as u64;
            assert_eq!(count_between(&offs, a, b), n, "({a}, {b}]");
        }
    }

    #[test]
    fn sync_offsets_table() {
        let cases: &[(&str, usize, i64)] = &[
            // (frequency, windows a day, last window of the day in minutes)
            ("15m", 96, 23 * 60 + 45),
            ("1h", 24, 23 * 60),
            ("7h", 4, 21 * 60),
            ("5h", 5, 20 * 60),
            ("1h45m", 14, 22 * 60 + 45),
            ("24h", 1, 0),
            ("express-full", 0, -1),
        ];
        for (f, n, last) in cases {
            let o = sync_offsets(f.parse().expect("freq"));
            assert_eq!(o.len(), *n, "{f}");
            assert_eq!(o.last().copied().unwrap_or(-60) / 60, *last, "{f}");
        }
    }

    #[test]
    fn next_times_table() {
        use ConsistencyCheck::*;
        struct Case {
            name: &'static str,
            policy: GroupPolicy,
            now: i64,
            next_sync: i64,
            next_point: i64,
            next_cc: Option<i64>,
        }
        let cases = vec![
            Case {
                name: "15m grid mid-morning",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                now: at(0, 9, 7),
                next_sync: at(0, 9, 15),
                next_point: at(0, 20, 0),
                next_cc: None,
            },
            Case {
                name: "exactly on a window: the next one is strictly later",
                policy: pol("30m", "08:00,20:00", Manual),
                now: at(0, 8, 0),
                next_sync: at(0, 8, 30),
                next_point: at(0, 20, 0),
                next_cc: None,
            },
            Case {
                name: "midnight crossing",
                policy: pol("30m", "00:10", Daily(tod("00:05"))),
                now: at(0, 23, 50),
                next_sync: at(1, 0, 0),
                next_point: at(1, 0, 10),
                next_cc: Some(at(1, 0, 5)),
            },
            Case {
                name: "multiple points per day, between them",
                policy: pol("1h", "06:00,12:00,18:00", Daily(tod("02:00"))),
                now: at(2, 12, 30),
                next_sync: at(2, 13, 0),
                next_point: at(2, 18, 0),
                next_cc: Some(at(3, 2, 0)),
            },
            Case {
                name: "7h does not divide the day: 21:00 then 00:00",
                policy: pol("7h", "23:00", OnlyWhenInconsistent),
                now: at(0, 21, 30),
                next_sync: at(1, 0, 0),
                next_point: at(0, 23, 0),
                next_cc: None,
            },
            Case {
                name: "express full: sync is the recovery point",
                policy: pol("express-full", "08:00,20:00", OnlyWhenInconsistent),
                now: at(0, 20, 0),
                next_sync: at(1, 8, 0),
                next_point: at(1, 8, 0),
                next_cc: None,
            },
        ];
        for c in cases {
            let p = plan(&c.policy, c.now, &LastRuns::default(), c.now);
            assert_eq!(
                (p.next_sync, p.next_recovery_point, p.next_consistency_check),
                (c.next_sync, c.next_point, c.next_cc),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn due_and_missed_table() {
        use ConsistencyCheck::{Daily, Manual, OnlyWhenInconsistent};
        use RunKind::{RecoveryPoint, Sync};
        fn w(at: i64, kind: RunKind) -> Window {
            Window { at, kind }
        }
        struct Case {
            name: &'static str,
            policy: GroupPolicy,
            since: i64,
            last: LastRuns,
            now: i64,
            due: Option<(RunKind, i64)>,
            due_cc: Option<i64>,
            missed: Vec<Window>,
            missed_total: u64,
        }
        let cases = vec![
            Case {
                name: "new group: nothing before `since` is due",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 9, 7),
                last: LastRuns::default(),
                now: at(0, 9, 7),
                due: None,
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "on time: one sync due, nothing missed",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 9, 0)),
                    ..Default::default()
                },
                now: at(0, 9, 15),
                due: Some((Sync, at(0, 9, 15))),
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "already ran this window",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 9, 15)),
                    ..Default::default()
                },
                now: at(0, 9, 20),
                due: None,
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "recovery point wins over the sync at the same instant",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 19, 45)),
                    recovery_point: Some(at(-1, 20, 0)),
                    ..Default::default()
                },
                now: at(0, 20, 0),
                due: Some((RecoveryPoint, at(0, 20, 0))),
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "a recovery-point run settles the syncs before it",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 19, 0)),
                    recovery_point: Some(at(0, 20, 0)),
                    ..Default::default()
                },
                now: at(0, 20, 10),
                due: None,
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "gateway down 09:05-10:05: three syncs missed, 10:00 due",
                policy: pol("15m", "20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 9, 0)),
                    recovery_point: Some(at(-1, 20, 0)),
                    ..Default::default()
                },
                now: at(0, 10, 5),
                due: Some((Sync, at(0, 10, 0))),
                due_cc: None,
                missed: vec![
                    w(at(0, 9, 15), Sync),
                    w(at(0, 9, 30), Sync),
                    w(at(0, 9, 45), Sync),
                ],
                missed_total: 3,
            },
            Case {
                name: "outage across midnight and two recovery points",
                policy: pol("6h", "08:00,20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(0, 18, 0)),
                    recovery_point: Some(at(0, 8, 0)),
                    ..Default::default()
                },
                now: at(1, 9, 0),
                due: Some((RecoveryPoint, at(1, 8, 0))),
                due_cc: None,
                missed: vec![w(at(0, 20, 0), RecoveryPoint), w(at(1, 0, 0), Sync)],
                // syncs (18:00, 09:00] = 00:00, 06:00 → 06:00 covered by the run now.
                missed_total: 2,
            },
            Case {
                name: "express full: only recovery-point windows, missed reported",
                policy: pol("express-full", "08:00,20:00", OnlyWhenInconsistent),
                since: at(0, 0, 0),
                last: LastRuns {
                    recovery_point: Some(at(0, 8, 0)),
                    ..Default::default()
                },
                now: at(1, 20, 1),
                due: Some((RecoveryPoint, at(1, 20, 0))),
                due_cc: None,
                missed: vec![
                    w(at(0, 20, 0), RecoveryPoint),
                    w(at(1, 8, 0), RecoveryPoint),
                ],
                missed_total: 2,
            },
            Case {
                name: "scheduled consistency check due and one missed",
                policy: pol("24h", "20:00", Daily(tod("02:00"))),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(2, 0, 0)),
                    recovery_point: Some(at(1, 20, 0)),
                    consistency_check: Some(at(0, 2, 0)),
                },
                now: at(2, 3, 0),
                due: None,
                due_cc: Some(at(2, 2, 0)),
                missed: vec![w(at(1, 2, 0), RunKind::ConsistencyCheck)],
                missed_total: 1,
            },
            Case {
                name: "manual consistency check is never due",
                policy: pol("24h", "20:00", Manual),
                since: at(0, 0, 0),
                last: LastRuns {
                    sync: Some(at(2, 0, 0)),
                    recovery_point: Some(at(1, 20, 0)),
                    consistency_check: None,
                },
                now: at(2, 3, 0),
                due: None,
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
            Case {
                name: "clock went backwards: nothing due",
                policy: pol("15m", "20:00", Daily(tod("02:00"))),
                since: at(5, 0, 0),
                last: LastRuns {
                    sync: Some(at(5, 0, 0)),
                    ..Default::default()
                },
                now: at(4, 0, 0),
                due: None,
                due_cc: None,
                missed: vec![],
                missed_total: 0,
            },
        ];
        for c in cases {
            let p = plan(&c.policy, c.since, &c.last, c.now);
            assert_eq!(
                p.due_backup.map(|d| (d.kind, d.window)),
                c.due,
                "{}: due",
                c.name
            );
            if let Some(d) = p.due_backup {
                assert_eq!(d.full, d.kind == RecoveryPoint, "{}: full", c.name);
            }
            assert_eq!(p.due_consistency_check, c.due_cc, "{}: due cc", c.name);
            assert_eq!(p.missed, c.missed, "{}: missed", c.name);
            assert_eq!(p.missed_total, c.missed_total, "{}: missed total", c.name);
        }
    }

    #[test]
    fn long_outage_is_bounded_and_counted_exactly() {
        let policy = pol("15m", "08:00,20:00", ConsistencyCheck::Daily(tod("02:00")));
        let last = LastRuns {
            sync: Some(at(0, 0, 0)),
            recovery_point: Some(at(0, 0, 0)),
            consistency_check: Some(at(0, 0, 0)),
        };
        // 100 days down, back at day 100 00:00:30.
        let now = at(100, 0, 0) + 30;
        let p = plan(&policy, at(0, 0, 0), &last, now);
        assert_eq!(p.missed.len(), MAX_MISSED);
        // syncs: 9600 windows in (0, now], one due; points: 200, one due
        // (2 × 100 days, the newest is day 99 20:00); checks: 100, one due.
        assert_eq!(p.missed_total, 9599 + 199 + 99);
        assert_eq!(
            p.due_backup,
            Some(DueBackup {
                kind: RunKind::RecoveryPoint,
                window: at(99, 20, 0),
                full: true
            })
        );
        assert_eq!(p.due_consistency_check, Some(at(99, 2, 0)));
        // The listed ones are the newest, oldest first, all before now.
        assert!(p.missed.windows(2).all(|w| w[0] <= w[1]));
        assert!(p.missed.iter().all(|w| w.at < now));
        assert_eq!(p.missed.last().map(|w| w.at), Some(at(99, 23, 45)));
        // Ten years down stays cheap (counting is arithmetic).
        let p = plan(&policy, at(0, 0, 0), &last, at(3650, 0, 0));
        assert_eq!(p.missed.len(), MAX_MISSED);
        assert_eq!(
            p.missed_total,
            (96 * 3650 - 1) + (2 * 3650 - 1) + (3650 - 1)
        );
    }
}
