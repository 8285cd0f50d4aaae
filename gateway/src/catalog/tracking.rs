//! Change-tracking facts stored with recovery points (migration 0005): the
//! change-tracking id and DataWriteGuid the agent recorded per disk stream,
//! and the VM's newest point, which the next backup is a delta against.

use tierback_format::wire::DiskTrackingIds;

use super::{Catalog, Result};

impl Catalog {
    /// Id of the VM's newest committed point (by id, not name), in commit
    /// order even within one second.
    pub async fn last_point_of_vm(&self, vm_id: &str) -> Result<Option<String>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM points WHERE vm_id = ? AND state = 'committed' \
             ORDER BY created_at DESC, rowid DESC LIMIT 1",
        )
        .bind(vm_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Records the tracking ids of a point's streams (before its commit).
    pub async fn put_point_tracking(
        &self,
        point_id: &str,
        base_point: Option<&str>,
        streams: &[(u32, DiskTrackingIds)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (n, ids) in streams {
            sqlx::query(
                "INSERT OR REPLACE INTO point_tracking \
                 (point_id, stream_no, change_id, data_write_guid, base_point) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(point_id)
            .bind(i64::from(*n))
            .bind(&ids.change_id)
            .bind(&ids.data_write_guid)
            .bind(base_point)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The tracking ids recorded with a point, by stream number.
    pub async fn point_tracking(&self, point_id: &str) -> Result<Vec<(u32, DiskTrackingIds)>> {
        let rows: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT stream_no, change_id, data_write_guid FROM point_tracking \
             WHERE point_id = ? ORDER BY stream_no",
        )
        .bind(point_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(n, change_id, data_write_guid)| {
                Some((
                    u32::try_from(n).ok()?,
                    DiskTrackingIds {
                        change_id,
                        data_write_guid,
                    },
                ))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tracking_rows_round_trip() {
        let t = tempfile::tempdir().expect("tmp");
        let c = Catalog::open(&t.path().join("c.db")).await.expect("open");
        assert_eq!(c.last_point_of_vm("vm").await.expect("last"), None);
        let ids = DiskTrackingIds {
            change_id: Some("rct-1".into()),
            data_write_guid: None,
        };
        c.put_point_tracking("p1", None, &[(0, ids.clone())])
            .await
            .expect("put");
        assert_eq!(c.point_tracking("p1").await.expect("get"), vec![(0, ids)]);
        assert!(c.point_tracking("p2").await.expect("get").is_empty());
    }
}
