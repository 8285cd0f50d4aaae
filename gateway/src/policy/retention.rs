//! Short-term retention on the local tier (MABS "retention range").
//!
//! A recovery point expires when it is older than the group's short-term
//! range at `now` — except the newest point of each VM, which is always kept
//! so that a VM whose backups stopped never loses its last recovery point.

use std::collections::HashMap;

pub use super::DAY_SECS;

/// Retention part of a group policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Short-term retention range on the local tier, in days (1–448).
    pub short_term_days: u32,
}

/// What retention needs to know about one recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointMeta {
    pub id: String,
    pub vm_id: String,
    /// Unix seconds (UTC).
    pub created_at: i64,
}

/// Ids of the points past the short-term range at `now`; never the newest point of a VM.
///
/// A point is past the range when `created_at < now - short_term_days * 86400`
/// (a point exactly at the boundary is kept). The newest point of a VM is the
/// one with the greatest `created_at` (ties broken by the greatest id, so the
/// result is deterministic). Output follows the input order.
pub fn expired(points: &[PointMeta], policy: &RetentionPolicy, now: i64) -> Vec<String> {
    let cutoff = now.saturating_sub(i64::from(policy.short_term_days).saturating_mul(DAY_SECS));
    let mut newest: HashMap<&str, &PointMeta> = HashMap::new();
    for p in points {
        let e = newest.entry(p.vm_id.as_str()).or_insert(p);
        if (p.created_at, p.id.as_str()) > (e.created_at, e.id.as_str()) {
            *e = p;
        }
    }
    points
        .iter()
        .filter(|p| p.created_at < cutoff)
        .filter(|p| !std::ptr::eq(*p, newest[p.vm_id.as_str()]))
        .map(|p| p.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn p(id: &str, vm: &str, age_days: f64) -> PointMeta {
        PointMeta {
            id: id.into(),
            vm_id: vm.into(),
            created_at: NOW - (age_days * DAY_SECS as f64) as i64,
        }
    }

    #[test]
    fn expired_table() {
        struct Case {
            name: &'static str,
            days: u32,
            points: Vec<PointMeta>,
            want: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "empty",
                days: 5,
                points: vec![],
                want: vec![],
            },
            Case {
                name: "all within range",
                days: 5,
                points: vec![p("a", "vm1", 1.0), p("b", "vm1", 4.9)],
                want: vec![],
            },
            Case {
                name: "old ones expire, newest kept",
                days: 5,
                points: vec![p("a", "vm1", 10.0), p("b", "vm1", 6.0), p("c", "vm1", 1.0)],
                want: vec!["a", "b"],
            },
            Case {
                name: "only point of a VM is never expired",
                days: 1,
                points: vec![p("a", "vm1", 400.0)],
                want: vec![],
            },
            Case {
                name: "all old: newest of each VM kept",
                days: 1,
                points: vec![
                    p("a", "vm1", 30.0),
                    p("b", "vm1", 20.0),
                    p("c", "vm2", 25.0),
                    p("d", "vm2", 40.0),
                ],
                want: vec!["a", "d"],
            },
            Case {
                name: "exact boundary is kept, one second older expires",
                days: 2,
                points: vec![
                    PointMeta {
                        id: "edge".into(),
                        vm_id: "v".into(),
                        created_at: NOW - 2 * DAY_SECS,
                    },
                    PointMeta {
                        id: "older".into(),
                        vm_id: "v".into(),
                        created_at: NOW - 2 * DAY_SECS - 1,
                    },
                    p("new", "v", 0.0),
                ],
                want: vec!["older"],
            },
            Case {
                name: "VMs are independent",
                days: 3,
                points: vec![p("a", "vm1", 5.0), p("b", "vm1", 1.0), p("c", "vm2", 5.0)],
                want: vec!["a"],
            },
            Case {
                name: "input order preserved, unsorted input",
                days: 1,
                points: vec![p("new", "v", 0.5), p("x", "v", 9.0), p("y", "v", 3.0)],
                want: vec!["x", "y"],
            },
            Case {
                name: "timestamp tie: greatest id is the newest",
                days: 1,
                points: vec![
                    PointMeta {
                        id: "p1".into(),
                        vm_id: "v".into(),
                        created_at: NOW - 10 * DAY_SECS,
                    },
                    PointMeta {
                        id: "p2".into(),
                        vm_id: "v".into(),
                        created_at: NOW - 10 * DAY_SECS,
                    },
                ],
                want: vec!["p1"],
            },
            Case {
                name: "448-day range (MABS maximum)",
                days: 448,
                points: vec![p("a", "v", 449.0), p("b", "v", 447.0), p("c", "v", 0.0)],
                want: vec!["a"],
            },
            Case {
                name: "future-dated point is not expired",
                days: 1,
                points: vec![p("f", "v", -3.0), p("a", "v", 2.0)],
                want: vec!["a"],
            },
        ];
        for c in cases {
            let got = expired(
                &c.points,
                &RetentionPolicy {
                    short_term_days: c.days,
                },
                NOW,
            );
            assert_eq!(got, c.want, "case {:?}", c.name);
        }
    }
}
