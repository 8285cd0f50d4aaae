//! Disk-space review of a protection group: what its points hold today and a
//! projection of what its retention range will need (`tierback-gateway space`).
//!
//! # Model (deliberately simple, documented in docs/operations.md)
//!
//! Per member VM, from its committed points on the local tier:
//!
//! * `data_bytes` — logical bytes of its newest point (what a full restore
//!   would write, zero blocks excluded);
//! * `stored_bytes` — the sum of its points' `stored_bytes` (bytes each point
//!   added to the deduplicated store);
//! * daily change rate — the `stored_bytes` of its points from the last
//!   [`RATE_WINDOW_DAYS`] days, excluding its oldest point (which carries the
//!   initial full), divided by the days those points span (at least one day);
//!   zero when the VM has a single point;
//! * projection = `data_bytes + daily rate × retention days`: one full copy
//!   plus a retention range of changes.
//!
//! A group's numbers are the sums over its members. Dedup across VMs and
//! compression differences between points are not modelled.

use std::collections::BTreeMap;

use super::DAY_SECS;

/// How far back the change rate looks.
pub const RATE_WINDOW_DAYS: i64 = 7;

/// What the projection needs of one recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointSize {
    pub vm_id: String,
    /// Unix seconds (UTC).
    pub created_at: i64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
}

/// Space figures of one VM or one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceEstimate {
    /// Recovery points counted.
    pub points: u64,
    /// Logical bytes of the newest point(s).
    pub data_bytes: u64,
    /// Bytes the points added to the store.
    pub stored_bytes: u64,
    /// Estimated bytes of change per day.
    pub daily_change_bytes: u64,
    /// `data_bytes + daily_change_bytes × retention_days`.
    pub projected_bytes: u64,
}

/// Space figures of one VM from its points (any order) for a retention range
/// of `retention_days` at `now`.
pub fn estimate_vm(points: &[PointSize], retention_days: u32, now: i64) -> SpaceEstimate {
    let mut sorted: Vec<&PointSize> = points.iter().collect();
    sorted.sort_by_key(|p| p.created_at);
    let Some(newest) = sorted.last() else {
        return SpaceEstimate::default();
    };
    let stored_bytes = sorted
        .iter()
        .map(|p| p.stored_bytes)
        .fold(0u64, u64::saturating_add);
    let since = now.saturating_sub(RATE_WINDOW_DAYS * DAY_SECS);
    let recent: Vec<&&PointSize> = sorted
        .iter()
        .skip(1)
        .filter(|p| p.created_at >= since)
        .collect();
    let daily_change_bytes = match (recent.first(), recent.last()) {
        (Some(first), Some(last)) => {
            // The span starts at the point before the first recent one, so
            // one change a day over one day is one day's worth.
            let idx = sorted
                .iter()
                .position(|p| std::ptr::eq(*p, **first))
                .unwrap_or(1);
            let start = sorted[idx.saturating_sub(1)].created_at;
            let span = (last.created_at - start).max(DAY_SECS);
            let sum: u128 = recent.iter().map(|p| u128::from(p.stored_bytes)).sum();
            u64::try_from(sum * u128::from(DAY_SECS as u64) / span as u128).unwrap_or(u64::MAX)
        }
        _ => 0,
    };
    let projected_bytes = newest
        .logical_bytes
        .saturating_add(daily_change_bytes.saturating_mul(u64::from(retention_days)));
    SpaceEstimate {
        points: sorted.len() as u64,
        data_bytes: newest.logical_bytes,
        stored_bytes,
        daily_change_bytes,
        projected_bytes,
    }
}

/// Space figures of a group: [`estimate_vm`] per VM in `points`, summed.
pub fn estimate_group(points: &[PointSize], retention_days: u32, now: i64) -> SpaceEstimate {
    let mut by_vm: BTreeMap<&str, Vec<PointSize>> = BTreeMap::new();
    for p in points {
        by_vm.entry(p.vm_id.as_str()).or_default().push(p.clone());
    }
    by_vm
        .values()
        .map(|v| estimate_vm(v, retention_days, now))
        .fold(SpaceEstimate::default(), |a, b| SpaceEstimate {
            points: a.points + b.points,
            data_bytes: a.data_bytes.saturating_add(b.data_bytes),
            stored_bytes: a.stored_bytes.saturating_add(b.stored_bytes),
            daily_change_bytes: a.daily_change_bytes.saturating_add(b.daily_change_bytes),
            projected_bytes: a.projected_bytes.saturating_add(b.projected_bytes),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const GB: u64 = 1 << 30;
    const MB: u64 = 1 << 20;

    fn p(vm: &str, days_ago: f64, logical: u64, stored: u64) -> PointSize {
        PointSize {
            vm_id: vm.into(),
            created_at: NOW - (days_ago * DAY_SECS as f64) as i64,
            logical_bytes: logical,
            stored_bytes: stored,
        }
    }

    #[test]
    fn estimate_vm_table() {
        struct Case {
            name: &'static str,
            points: Vec<PointSize>,
            days: u32,
            want: SpaceEstimate,
        }
        let e = |points, data, stored, daily, projected| SpaceEstimate {
            points,
            data_bytes: data,
            stored_bytes: stored,
            daily_change_bytes: daily,
            projected_bytes: projected,
        };
        let cases = vec![
            Case {
                name: "no points",
                points: vec![],
                days: 5,
                want: SpaceEstimate::default(),
            },
            Case {
                name: "one full: no change rate, projection = data",
                points: vec![p("v", 0.0, 10 * GB, 6 * GB)],
                days: 5,
                want: e(1, 10 * GB, 6 * GB, 0, 10 * GB),
            },
            Case {
                name: "daily incrementals of 100 MiB",
                points: vec![
                    p("v", 3.0, 10 * GB, 6 * GB),
                    p("v", 2.0, 10 * GB, 100 * MB),
                    p("v", 1.0, 10 * GB, 100 * MB),
                    p("v", 0.0, 11 * GB, 100 * MB),
                ],
                days: 10,
                want: e(4, 11 * GB, 6 * GB + 300 * MB, 100 * MB, 11 * GB + 1000 * MB),
            },
            Case {
                name: "two points a day: rate per day, not per point",
                points: vec![
                    p("v", 2.0, GB, GB),
                    p("v", 1.5, GB, 10 * MB),
                    p("v", 1.0, GB, 10 * MB),
                    p("v", 0.5, GB, 10 * MB),
                    p("v", 0.0, GB, 10 * MB),
                ],
                days: 1,
                want: e(5, GB, GB + 40 * MB, 20 * MB, GB + 20 * MB),
            },
            Case {
                name: "points older than the rate window do not count for the rate",
                points: vec![
                    p("v", 30.0, GB, GB),
                    p("v", 20.0, GB, 500 * MB),
                    p("v", 1.0, GB, 10 * MB),
                ],
                days: 2,
                // span from the previous point (20 days ago) to the recent one.
                want: e(3, GB, GB + 510 * MB, 10 * MB / 19, GB + 2 * (10 * MB / 19)),
            },
            Case {
                name: "burst within an hour counts as one day",
                points: vec![
                    p("v", 0.1, GB, GB),
                    p("v", 0.05, GB, 50 * MB),
                    p("v", 0.0, 2 * GB, 50 * MB),
                ],
                days: 3,
                want: e(3, 2 * GB, GB + 100 * MB, 100 * MB, 2 * GB + 300 * MB),
            },
            Case {
                name: "unsorted input",
                points: vec![p("v", 0.0, 2 * GB, MB), p("v", 1.0, GB, GB)],
                days: 448,
                want: e(2, 2 * GB, GB + MB, MB, 2 * GB + 448 * MB),
            },
        ];
        for c in cases {
            assert_eq!(estimate_vm(&c.points, c.days, NOW), c.want, "{}", c.name);
        }
    }

    #[test]
    fn estimate_group_sums_members() {
        let pts = vec![
            p("a", 1.0, GB, GB),
            p("a", 0.0, GB, 10 * MB),
            p("b", 0.0, 3 * GB, 2 * GB),
        ];
        let g = estimate_group(&pts, 5, NOW);
        assert_eq!(g.points, 3);
        assert_eq!(g.data_bytes, 4 * GB);
        assert_eq!(g.stored_bytes, 3 * GB + 10 * MB);
        assert_eq!(g.daily_change_bytes, 10 * MB);
        assert_eq!(g.projected_bytes, 4 * GB + 50 * MB);
        assert_eq!(estimate_group(&[], 5, NOW), SpaceEstimate::default());
        // Saturates instead of overflowing.
        let huge = vec![
            p("a", 1.0, u64::MAX, u64::MAX),
            p("a", 0.0, u64::MAX, u64::MAX),
        ];
        assert_eq!(estimate_vm(&huge, 448, NOW).projected_bytes, u64::MAX);
    }
}
