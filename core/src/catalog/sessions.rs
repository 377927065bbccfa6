//! Web console sessions: the catalog side of signing in. A session is found by the sha256 of its
//! secret (the cookie's value is never stored) and resolves to the same [`Principal`] as a token,
//! with the user's current role and groups, so every scope check applies unchanged.

use sqlx::FromRow;

use super::db::run;
use super::{Catalog, CatalogError, Principal, Result, now_ms};

#[derive(FromRow)]
struct SessionRow {
    id: i64,
    last_seen_ms: i64,
    expires_ms: i64,
    user_name: String,
    role: String,
    groups: String,
}

impl Catalog {
    /// Starts a session of user `name` that ends at `expires_ms` at the latest: its id, or `None`
    /// when there is no such user. Sessions that ended long ago are swept on the way.
    pub async fn create_session(
        &self,
        name: &str,
        secret_sha256: &str,
        expires_ms: i64,
    ) -> Result<Option<i64>> {
        let now = now_ms();
        run!(
            &self.pool,
            sqlx::query("DELETE FROM console_sessions WHERE expires_ms <= ?1").bind(now),
            execute
        )?;
        let id: Option<i64> = run!(
            &self.pool,
            sqlx::query_scalar(
            "INSERT INTO console_sessions (secret_sha256, user_id, created_ms, last_seen_ms, expires_ms)
             SELECT ?2, id, ?3, ?3, ?4 FROM users WHERE name = ?1 RETURNING id",
            )
            .bind(name)
            .bind(secret_sha256)
            .bind(now)
            .bind(expires_ms),
            fetch_optional
        )?;
        Ok(id)
    }

    /// The live session with this secret, as its user's principal (`token_id` is the session's
    /// id, negated, so it never names a token): `None` when it is unknown, signed out, expired, or
    /// unused for longer than `idle_ms`. Use counts as activity.
    pub async fn session(
        &self,
        secret_sha256: &str,
        idle_ms: i64,
    ) -> Result<Option<(i64, Principal)>> {
        let row: Option<SessionRow> = run!(
            &self.pool,
            sqlx::query_as(
            "SELECT s.id, s.last_seen_ms, s.expires_ms, u.name AS user_name, u.role,
                    (SELECT json_group_array(json_object('hostnames', json(g.hostnames),
                            'cidrs', json(g.cidrs), 'labels', json(g.labels), 'members', json(g.members)))
                     FROM user_groups ug JOIN computer_groups g ON g.id = ug.group_id
                     WHERE ug.user_id = u.id) AS groups
             FROM console_sessions s JOIN users u ON u.id = s.user_id
             WHERE s.secret_sha256 = ?1",
            )
            .bind(secret_sha256),
            fetch_optional
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        let now = now_ms();
        if row.expires_ms <= now || now - row.last_seen_ms > idle_ms {
            run!(
                &self.pool,
                sqlx::query("DELETE FROM console_sessions WHERE id = ?1").bind(row.id),
                execute
            )?;
            return Ok(None);
        }
        if now - row.last_seen_ms > 10_000 {
            run!(
                &self.pool,
                sqlx::query("UPDATE console_sessions SET last_seen_ms = ?2 WHERE id = ?1")
                    .bind(row.id)
                    .bind(now),
                execute
            )?;
        }
        Ok(Some((
            row.id,
            Principal {
                token_id: -row.id,
                name: row.user_name,
                role: row.role.parse()?,
                groups: serde_json::from_str(&row.groups)
                    .map_err(|e| CatalogError::Invalid(format!("stored group rules: {e}")))?,
            },
        )))
    }

    /// Ends the session with this secret (sign-out); whether there was one.
    pub async fn end_session(&self, secret_sha256: &str) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query("DELETE FROM console_sessions WHERE secret_sha256 = ?1")
                .bind(secret_sha256),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }
}
