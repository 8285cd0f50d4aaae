//! Protection groups and their members (schema in `migrations/0003_groups.sql`):
//! every SQL statement about groups lives here.
//!
//! A VM is in at most one group; the `UNIQUE` constraint on
//! `group_members.vm_id` enforces it, so two admins adding the same VM to two
//! groups at once cannot both win. Policy values are validated by
//! `crate::policy` before they get here and again when read back.

use super::{Catalog, CatalogError, Result};
use crate::policy::{
    retention::RetentionPolicy, ConsistencyCheck, GroupPolicy, SyncFrequency, TimeOfDay,
};

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupRow {
    pub name: String,
    /// `None`: express full just before each recovery point.
    pub sync_minutes: Option<i64>,
    /// Recovery-point times as minutes after midnight UTC, comma-separated.
    pub points_at: String,
    pub short_term_days: i64,
    pub chunk_size: i64,
    /// `only-when-inconsistent`, `scheduled` or `manual`.
    pub consistency_check: String,
    /// Minutes after midnight UTC of a scheduled check.
    pub consistency_check_at: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A member VM of a group, with what the catalog knows of it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupMemberRow {
    pub group_name: String,
    pub vm_id: String,
    pub vm_name: String,
    pub agent_id: String,
    /// Unix seconds.
    pub added_at: i64,
}

/// A VM as named by an admin (`--vm NAME|ID`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VmRef {
    pub id: String,
    pub name: String,
}

/// What a recovery point contributes to a group's space figures.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupPointRow {
    pub group_name: String,
    pub vm_id: String,
    pub created_at: i64,
    pub logical_bytes: i64,
    pub stored_bytes: i64,
}

/// Outcome of [`Catalog::add_group_member`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddMember {
    /// The VM joined the group.
    Added,
    /// The VM was already in this group (nothing changed).
    AlreadyMember,
    /// The VM is in another group (named); nothing changed.
    InOtherGroup(String),
    /// There is no such group.
    NoGroup,
}

const GROUP_COLUMNS: &str = "name, sync_minutes, points_at, short_term_days, chunk_size, \
     consistency_check, consistency_check_at, created_at";

const MEMBER_SELECT: &str =
    "SELECT m.group_name, m.vm_id, v.name AS vm_name, v.agent_id, m.added_at \
     FROM group_members m JOIN vms v ON v.id = m.vm_id";

impl GroupRow {
    /// The row of a (validated) policy.
    pub fn new(name: &str, p: &GroupPolicy, created_at: i64) -> Self {
        Self {
            name: name.to_string(),
            sync_minutes: p.sync.minutes().map(i64::from),
            points_at: p
                .points_at
                .iter()
                .map(|t| t.minutes().to_string())
                .collect::<Vec<_>>()
                .join(","),
            short_term_days: i64::from(p.retention.short_term_days),
            chunk_size: i64::from(p.chunk_size),
            consistency_check: p.consistency_check.mode().to_string(),
            consistency_check_at: p.consistency_check.at().map(|t| i64::from(t.minutes())),
            created_at,
        }
    }

    /// The policy this row holds, validated again.
    pub fn policy(&self) -> Result<GroupPolicy> {
        let bad = |what: &str| {
            CatalogError::Invalid(format!("group {:?} holds an invalid {what}", self.name))
        };
        let minutes = |v: i64| -> Result<TimeOfDay> {
            u32::try_from(v)
                .ok()
                .and_then(|m| TimeOfDay::new(m / 60, m % 60))
                .ok_or_else(|| bad("time of day"))
        };
        let sync = SyncFrequency::from_minutes(
            self.sync_minutes
                .map(|m| u32::try_from(m).map_err(|_| bad("sync frequency")))
                .transpose()?,
        )
        .map_err(|_| bad("sync frequency"))?;
        let points_at = self
            .points_at
            .split(',')
            .map(|s| s.parse::<i64>().map_err(|_| bad("recovery-point time")))
            .map(|r| r.and_then(minutes))
            .collect::<Result<Vec<_>>>()?;
        let consistency_check = match (self.consistency_check.as_str(), self.consistency_check_at) {
            ("only-when-inconsistent", _) => ConsistencyCheck::OnlyWhenInconsistent,
            ("manual", _) => ConsistencyCheck::Manual,
            ("scheduled", Some(at)) => ConsistencyCheck::Daily(minutes(at)?),
            _ => return Err(bad("consistency-check option")),
        };
        let p = GroupPolicy {
            sync,
            points_at,
            retention: RetentionPolicy {
                short_term_days: u32::try_from(self.short_term_days)
                    .map_err(|_| bad("retention range"))?,
            },
            chunk_size: u32::try_from(self.chunk_size).map_err(|_| bad("chunk size"))?,
            consistency_check,
        };
        p.validate()
            .map_err(|e| CatalogError::Invalid(format!("group {:?}: {e}", self.name)))?;
        Ok(p)
    }
}

impl Catalog {
    /// Creates a group; `false` if one with that name exists (nothing changed).
    pub async fn create_group(&self, g: &GroupRow) -> Result<bool> {
        let r = sqlx::query(&format!(
            "INSERT INTO groups ({GROUP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(name) DO NOTHING"
        ))
        .bind(&g.name)
        .bind(g.sync_minutes)
        .bind(&g.points_at)
        .bind(g.short_term_days)
        .bind(g.chunk_size)
        .bind(&g.consistency_check)
        .bind(g.consistency_check_at)
        .bind(g.created_at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every group, by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupRow>> {
        Ok(sqlx::query_as::<_, GroupRow>(&format!(
            "SELECT {GROUP_COLUMNS} FROM groups ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// One group.
    pub async fn get_group(&self, name: &str) -> Result<Option<GroupRow>> {
        Ok(sqlx::query_as::<_, GroupRow>(&format!(
            "SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Deletes a group and its memberships (the VMs' points stay); `false`
    /// if there was no such group.
    pub async fn delete_group(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM groups WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// VMs whose id, or else whose name, is `key` (several when a name is
    /// shared by VMs of different hosts).
    pub async fn find_vms(&self, key: &str) -> Result<Vec<VmRef>> {
        let by_id = sqlx::query_as::<_, VmRef>("SELECT id, name FROM vms WHERE id = ?")
            .bind(key)
            .fetch_all(&self.pool)
            .await?;
        if !by_id.is_empty() {
            return Ok(by_id);
        }
        Ok(
            sqlx::query_as::<_, VmRef>("SELECT id, name FROM vms WHERE name = ? ORDER BY id")
                .bind(key)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Puts a VM into a group unless it is in one already.
    pub async fn add_group_member(&self, group: &str, vm_id: &str, now: i64) -> Result<AddMember> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT name FROM groups WHERE name = ?")
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(AddMember::NoGroup);
        }
        let r = sqlx::query(
            "INSERT INTO group_members (vm_id, group_name, added_at) VALUES (?, ?, ?)
             ON CONFLICT(vm_id) DO NOTHING",
        )
        .bind(vm_id)
        .bind(group)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let outcome = if r.rows_affected() == 1 {
            AddMember::Added
        } else {
            let current: String =
                sqlx::query_scalar("SELECT group_name FROM group_members WHERE vm_id = ?")
                    .bind(vm_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if current == group {
                AddMember::AlreadyMember
            } else {
                AddMember::InOtherGroup(current)
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Takes a VM out of a group; `false` if it was not a member of it.
    pub async fn remove_group_member(&self, group: &str, vm_id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM group_members WHERE group_name = ? AND vm_id = ?")
            .bind(group)
            .bind(vm_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Members of every group (`None`) or of one, by group then VM name.
    pub async fn group_members(&self, group: Option<&str>) -> Result<Vec<GroupMemberRow>> {
        let order = "ORDER BY m.group_name, v.name, m.vm_id";
        let rows = match group {
            Some(g) => {
                sqlx::query_as::<_, GroupMemberRow>(&format!(
                    "{MEMBER_SELECT} WHERE m.group_name = ? {order}"
                ))
                .bind(g)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as::<_, GroupMemberRow>(&format!("{MEMBER_SELECT} {order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows)
    }

    /// The group a VM belongs to, if any.
    pub async fn group_of_vm(&self, vm_id: &str) -> Result<Option<GroupRow>> {
        Ok(sqlx::query_as::<_, GroupRow>(&format!(
            "SELECT {} FROM groups g JOIN group_members m ON m.group_name = g.name
             WHERE m.vm_id = ?",
            GROUP_COLUMNS
                .split(", ")
                .map(|c| format!("g.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(vm_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Committed points of the members of every group (`None`) or of one.
    pub async fn group_points(&self, group: Option<&str>) -> Result<Vec<GroupPointRow>> {
        let base = "SELECT m.group_name, p.vm_id, p.created_at, p.logical_bytes, p.stored_bytes
             FROM points p JOIN group_members m ON m.vm_id = p.vm_id
             WHERE p.state = 'committed'";
        let order = "ORDER BY m.group_name, p.vm_id, p.created_at, p.id";
        let rows = match group {
            Some(g) => {
                sqlx::query_as::<_, GroupPointRow>(&format!("{base} AND m.group_name = ? {order}"))
                    .bind(g)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query_as::<_, GroupPointRow>(&format!("{base} {order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{now_secs, NewPoint};
    use tierback_format::ids::PointId;

    async fn catalog() -> (tempfile::TempDir, Catalog) {
        let (dir, c) = crate::catalog::test_catalog().await;
        c.add_enroll_token(b"t", now_secs() + 60)
            .await
            .expect("tok");
        c.enroll_agent(b"t", "a1", "hv1", b"s")
            .await
            .expect("enrol");
        for (id, name) in [("vm1", "web01"), ("vm2", "sql01"), ("vm3", "web01")] {
            c.upsert_vm(id, name, "a1", "Running", "{}")
                .await
                .expect("vm");
        }
        (dir, c)
    }

    fn policy() -> GroupPolicy {
        GroupPolicy {
            sync: SyncFrequency::JustBeforeRecoveryPoint,
            points_at: crate::policy::parse_points_at("08:00,20:30").expect("points"),
            retention: RetentionPolicy {
                short_term_days: 14,
            },
            chunk_size: 4 << 20,
            consistency_check: ConsistencyCheck::Daily(TimeOfDay::new(2, 15).expect("t")),
        }
    }

    #[tokio::test]
    async fn groups_round_trip_list_get_delete() {
        let (_d, c) = catalog().await;
        let row = GroupRow::new("prod", &policy(), 100);
        assert_eq!(row.points_at, "480,1230");
        assert!(c.create_group(&row).await.expect("create"));
        assert!(!c
            .create_group(&GroupRow::new("prod", &GroupPolicy::default(), 5))
            .await
            .expect("dup"));
        let dev = GroupRow::new("dev", &GroupPolicy::default(), 200);
        assert!(c.create_group(&dev).await.expect("create"));
        let got = c.get_group("prod").await.expect("get").expect("exists");
        assert_eq!(got, row);
        assert_eq!(got.policy().expect("policy"), policy());
        assert_eq!(
            c.get_group("dev")
                .await
                .expect("get")
                .expect("dev")
                .policy()
                .expect("policy"),
            GroupPolicy::default()
        );
        assert!(c.get_group("nope").await.expect("get").is_none());
        let names: Vec<String> = c
            .list_groups()
            .await
            .expect("list")
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(names, ["dev", "prod"]);
        c.add_group_member("dev", "vm1", 1).await.expect("add");
        assert!(c.delete_group("dev").await.expect("delete"));
        assert!(!c.delete_group("dev").await.expect("delete again"));
        // Memberships went with the group.
        assert!(c.group_of_vm("vm1").await.expect("q").is_none());
        assert_eq!(
            c.add_group_member("prod", "vm1", 2).await.expect("add"),
            AddMember::Added
        );
    }

    #[tokio::test]
    async fn a_vm_is_in_at_most_one_group() {
        let (_d, c) = catalog().await;
        for n in ["a", "b"] {
            c.create_group(&GroupRow::new(n, &policy(), 1))
                .await
                .expect("create");
        }
        assert_eq!(
            c.add_group_member("a", "vm1", 10).await.expect("add"),
            AddMember::Added
        );
        assert_eq!(
            c.add_group_member("a", "vm1", 11).await.expect("again"),
            AddMember::AlreadyMember
        );
        assert_eq!(
            c.add_group_member("b", "vm1", 12).await.expect("other"),
            AddMember::InOtherGroup("a".into())
        );
        assert_eq!(
            c.add_group_member("zzz", "vm2", 12).await.expect("none"),
            AddMember::NoGroup
        );
        assert_eq!(
            c.add_group_member("b", "vm2", 13).await.expect("add"),
            AddMember::Added
        );
        // An unknown VM is refused by the foreign key.
        assert!(c.add_group_member("b", "ghost", 13).await.is_err());
        let all = c.group_members(None).await.expect("members");
        assert_eq!(
            all.iter()
                .map(|m| (m.group_name.as_str(), m.vm_id.as_str(), m.vm_name.as_str()))
                .collect::<Vec<_>>(),
            [("a", "vm1", "web01"), ("b", "vm2", "sql01")]
        );
        let b = c.group_members(Some("b")).await.expect("members");
        assert_eq!(
            (b.len(), b[0].added_at, b[0].agent_id.as_str()),
            (1, 13, "a1")
        );
        assert_eq!(
            c.group_of_vm("vm1").await.expect("q").map(|g| g.name),
            Some("a".into())
        );
        assert!(c.group_of_vm("vm3").await.expect("q").is_none());
        assert!(c.remove_group_member("a", "vm1").await.expect("rm"));
        assert!(!c.remove_group_member("a", "vm1").await.expect("rm again"));
        assert_eq!(
            c.add_group_member("b", "vm1", 14).await.expect("move"),
            AddMember::Added
        );
    }

    #[tokio::test]
    async fn find_vms_by_id_then_name() {
        let (_d, c) = catalog().await;
        let ids = |v: Vec<VmRef>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(c.find_vms("vm2").await.expect("q")), ["vm2"]);
        assert_eq!(ids(c.find_vms("sql01").await.expect("q")), ["vm2"]);
        assert_eq!(ids(c.find_vms("web01").await.expect("q")), ["vm1", "vm3"]);
        assert!(c.find_vms("nope").await.expect("q").is_empty());
    }

    #[tokio::test]
    async fn group_points_cover_members_only() {
        let (_d, c) = catalog().await;
        c.create_group(&GroupRow::new("g", &policy(), 1))
            .await
            .expect("create");
        c.create_group(&GroupRow::new("h", &policy(), 1))
            .await
            .expect("create");
        c.add_group_member("g", "vm1", 1).await.expect("add");
        c.add_group_member("h", "vm2", 1).await.expect("add");
        for (i, vm, at) in [
            (1u8, "vm1", 50),
            (2, "vm1", 60),
            (3, "vm2", 70),
            (4, "vm3", 80),
        ] {
            c.commit_point(&NewPoint {
                id: PointId([i; 16]),
                vm_id: vm.into(),
                vm_name: "x".into(),
                created_at: at,
                kind: "full".into(),
                agent_id: "a1".into(),
                job_id: None,
                logical_bytes: 1000 + u64::from(i),
                stored_bytes: 10 * u64::from(i),
                bytes_read: 0,
                bytes_sent: 0,
                streams: vec![],
            })
            .await
            .expect("commit");
        }
        let g = c.group_points(Some("g")).await.expect("points");
        assert_eq!(
            g.iter()
                .map(|p| (
                    p.vm_id.as_str(),
                    p.created_at,
                    p.logical_bytes,
                    p.stored_bytes
                ))
                .collect::<Vec<_>>(),
            [("vm1", 50, 1001, 10), ("vm1", 60, 1002, 20)]
        );
        let all = c.group_points(None).await.expect("points");
        assert_eq!(
            all.iter()
                .map(|p| (p.group_name.as_str(), p.vm_id.as_str()))
                .collect::<Vec<_>>(),
            [("g", "vm1"), ("g", "vm1"), ("h", "vm2")]
        );
    }

    #[test]
    fn invalid_rows_are_refused_on_read() {
        let good = GroupRow::new("g", &policy(), 1);
        let cases: Vec<(&str, GroupRow)> = vec![
            (
                "sync",
                GroupRow {
                    sync_minutes: Some(7),
                    ..good.clone()
                },
            ),
            (
                "points",
                GroupRow {
                    points_at: "x".into(),
                    ..good.clone()
                },
            ),
            (
                "points range",
                GroupRow {
                    points_at: "1440".into(),
                    ..good.clone()
                },
            ),
            (
                "retention",
                GroupRow {
                    short_term_days: 0,
                    ..good.clone()
                },
            ),
            (
                "chunk",
                GroupRow {
                    chunk_size: 3,
                    ..good.clone()
                },
            ),
            (
                "cc",
                GroupRow {
                    consistency_check: "weekly".into(),
                    ..good.clone()
                },
            ),
            (
                "cc at",
                GroupRow {
                    consistency_check_at: None,
                    ..good.clone()
                },
            ),
        ];
        for (what, row) in cases {
            assert!(row.policy().is_err(), "{what}");
        }
        assert!(good.policy().is_ok());
    }
}
