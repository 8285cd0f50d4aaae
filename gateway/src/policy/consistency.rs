//! When a consistency check of a protection-group member is due (pure,
//! table-tested; the scheduler queues it):
//!
//! - `scheduled` (`daily at HH:MM`): at its daily window
//!   ([`super::schedule::plan`]'s `due_consistency_check`);
//! - `only-when-inconsistent`: when a disk's change-tracking health, as the
//!   agent last reported it, is `fallback` or `reset`, or its last backup
//!   raised an alert — at most once per [`RETRIGGER_SECS`];
//! - `manual`: never (only `tierback-gateway consistency-check`).

use tierback_format::wire::TrackingHealth;

use super::ConsistencyCheck;

/// An inconsistency does not queue a new check within this long of the last
/// one (a check that keeps failing is not re-run every scheduler pass).
pub const RETRIGGER_SECS: i64 = 3600;

/// Why a check is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckTrigger {
    /// The daily window (unix seconds).
    Scheduled(i64),
    /// A disk is inconsistent: the reason.
    Inconsistent(String),
}

/// The first reason, over the VM's disks as last reported (`(label,
/// health)`), to doubt its replica: health `fallback`/`reset` or an alert.
pub fn inconsistency(disks: &[(String, Option<TrackingHealth>)]) -> Option<String> {
    disks.iter().find_map(|(label, h)| {
        let h = h.as_ref()?;
        if let Some(a) = h.alerts.first() {
            return Some(format!("{label}: alert: {a}"));
        }
        matches!(h.state.as_str(), "fallback" | "reset").then(|| {
            format!(
                "{label}: change tracking {}{}",
                h.state,
                h.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
    })
}

/// Whether to queue a check now: `scheduled_due` is the plan's due daily
/// window, `inconsistent` the result of [`inconsistency`], `last_check` when
/// the member's last check was queued.
pub fn check_due(
    mode: ConsistencyCheck,
    scheduled_due: Option<i64>,
    inconsistent: Option<&str>,
    last_check: Option<i64>,
    now: i64,
) -> Option<CheckTrigger> {
    match mode {
        ConsistencyCheck::Manual => None,
        ConsistencyCheck::Daily(_) => scheduled_due.map(CheckTrigger::Scheduled),
        ConsistencyCheck::OnlyWhenInconsistent => {
            let reason = inconsistent?;
            let recent = last_check.is_some_and(|t| now - t < RETRIGGER_SECS);
            (!recent).then(|| CheckTrigger::Inconsistent(reason.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TimeOfDay;

    fn h(state: &str, alerts: &[&str]) -> Option<TrackingHealth> {
        Some(TrackingHealth {
            state: state.into(),
            method: "compare".into(),
            reason: Some("why".into()),
            alerts: alerts.iter().map(|a| a.to_string()).collect(),
        })
    }

    type Disks = Vec<(String, Option<TrackingHealth>)>;

    #[test]
    fn inconsistency_from_health_and_alerts() {
        let d = |x| ("disk 0".to_string(), x);
        type Case<'a> = (&'a str, Disks, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("no disks", vec![], None),
            ("never reported", vec![d(None)], None),
            ("tracking", vec![d(h("tracking", &[]))], None),
            (
                "fallback",
                vec![d(h("tracking", &[])), d(h("fallback", &[]))],
                Some("disk 0: change tracking fallback (why)"),
            ),
            (
                "reset",
                vec![d(h("reset", &[]))],
                Some("disk 0: change tracking reset (why)"),
            ),
            (
                "alert wins",
                vec![d(h("tracking", &["missed writes"]))],
                Some("disk 0: alert: missed writes"),
            ),
        ];
        for (name, disks, want) in cases {
            assert_eq!(inconsistency(&disks).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn triggers_per_mode() {
        let daily = ConsistencyCheck::Daily(TimeOfDay::new(2, 0).expect("t"));
        let owi = ConsistencyCheck::OnlyWhenInconsistent;
        let man = ConsistencyCheck::Manual;
        let now = 100_000;
        type Case<'a> = (
            &'a str,
            ConsistencyCheck,
            Option<i64>,
            Option<&'a str>,
            Option<i64>,
            Option<CheckTrigger>,
        );
        let cases: Vec<Case> = vec![
            (
                "daily due",
                daily,
                Some(7200),
                None,
                None,
                Some(CheckTrigger::Scheduled(7200)),
            ),
            (
                "daily not due, even if inconsistent",
                daily,
                None,
                Some("x"),
                None,
                None,
            ),
            ("manual never", man, Some(7200), Some("x"), None, None),
            ("owi consistent", owi, Some(7200), None, None, None),
            (
                "owi inconsistent",
                owi,
                None,
                Some("x"),
                None,
                Some(CheckTrigger::Inconsistent("x".into())),
            ),
            (
                "owi checked recently",
                owi,
                None,
                Some("x"),
                Some(now - 60),
                None,
            ),
            (
                "owi checked long ago",
                owi,
                None,
                Some("x"),
                Some(now - RETRIGGER_SECS),
                Some(CheckTrigger::Inconsistent("x".into())),
            ),
        ];
        for (name, mode, sched, inc, last, want) in cases {
            assert_eq!(check_due(mode, sched, inc, last, now), want, "{name}");
        }
    }
}
