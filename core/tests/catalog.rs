//! The catalog's behaviour, on both of its backends from one source.
//!
//! Every test is an `async fn(Catalog)` that says what a user of the server would notice: the
//! values that come back, their order, paging, conflicts, counts and absent values. [`on_both!`]
//! runs each one twice, as `NAME::sqlite` (a catalog file in a temporary directory) and
//! `NAME::postgres` (a fresh schema of the test PostgreSQL, see `snapq-testpg`; skipped, saying
//! why, when there is none). A test that fails on one backend only is a dialect bug in the catalog.
//! (A module per test rather than `NAME_sqlite`/`NAME_postgres`: stable Rust cannot join
//! identifiers in a macro without another crate. `cargo test postgres` runs one backend.)
//! [`on_both_nodes!`] does the same for tests of two catalogs over one database, and the last test
//! copies a SQLite catalog into PostgreSQL (`snapq db migrate`) and compares every listing.
//!
//! Timestamps are the catalog's own (`now_ms`), so tests that filter by time take their bounds
//! from the rows the catalog returned instead of waiting for the clock to move.

use std::collections::BTreeMap;

use snapq_core::access::{GroupRules, Role};
use snapq_core::catalog::{
    AuditFilter, Catalog, CatalogError, ConnectionAttempt, Endpoint, ExportState, Heartbeat,
    NewEvidence, NewExport, Origin, SnapshotState, TokenRefusal, now_ms,
};
use snapq_core::fleet::{self, NewBatch, Schedule};
use snapq_core::verify::Verified;

/// Generates, for each `async fn NAME(Catalog)`, a module `NAME` with the tests `sqlite` and
/// `postgres` that run it on a fresh catalog of that backend.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().expect("temporary directory");
                let catalog = snapq_core::catalog::Catalog::open(&dir.path().join("catalog.db"))
                    .await
                    .expect("open the SQLite catalog");
                super::$name(catalog).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) =
                    snapq_testpg::schema_or_skip(concat!("catalog ", stringify!($name))).await
                else {
                    return;
                };
                let catalog = snapq_core::catalog::Catalog::connect_postgres(&db.url)
                    .await
                    .expect("connect the PostgreSQL catalog");
                assert_eq!(catalog.backend(), "postgres");
                super::$name(catalog).await;
            }
        }
    )*};
}

/// Like [`on_both!`] for `async fn NAME(Catalog, Catalog)`: two catalogs over one database, as
/// two server nodes over one PostgreSQL catalog (connected at the same moment, so that their
/// migrations race), or the server and a CLI command over one SQLite file.
macro_rules! on_both_nodes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use snapq_core::catalog::Catalog;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().expect("temporary directory");
                let path = dir.path().join("catalog.db");
                // One after the other: SQLite is one node's catalog, and sqlx takes no lock
                // around SQLite migrations (two first opens at once race to create the tables).
                let a = Catalog::open(&path).await.expect("first opener opens");
                let b = Catalog::open(&path).await.expect("second opener opens");
                super::$name(a, b).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) =
                    snapq_testpg::schema_or_skip(concat!("catalog ", stringify!($name))).await
                else {
                    return;
                };
                let (a, b) = tokio::join!(
                    Catalog::connect_postgres(&db.url),
                    Catalog::connect_postgres(&db.url)
                );
                super::$name(a.expect("first node connects"), b.expect("second node connects"))
                    .await;
            }
        }
    )*};
}

on_both_nodes!(two_nodes_migrating_at_once_share_one_catalog);

on_both!(
    enrollment_binds_a_hostname_once_until_rekeyed,
    heartbeats_need_the_enrolled_nonce_and_keep_the_pinned_certificate,
    forgetting_an_endpoint_keeps_it_only_while_snapshots_belong_to_it,
    ensure_endpoint_creates_an_offline_endpoint_once,
    search_finds_hostnames_and_addresses_with_prefix_matches_first,
    search_facts_pages_follow_the_search_order,
    metric_counts_count_endpoints_online_snapshots_connections_and_quarantine,
    a_capture_moves_through_its_states_to_complete_with_its_facts,
    failing_a_snapshot_keeps_finished_ones_as_they_are,
    unqueued_captures_are_queued_captures_without_a_job_outside_fleet_batches,
    snapshot_listings_order_newest_first_and_page_by_id,
    snapshot_endpoints_page_by_hostname,
    snapshot_summaries_count_states_and_find_the_newest,
    deleting_a_snapshot_says_whether_this_call_deleted_it,
    uploaded_snapshots_are_found_by_name_and_content,
    ingests_record_how_they_ended_and_retry_only_after_failing,
    quarantine_lists_open_entries_newest_first_and_closes_once,
    users_have_roles_groups_passwords_and_token_counts,
    adding_a_user_with_an_unknown_group_adds_nothing,
    removing_a_user_revokes_their_tokens_with_the_reason,
    the_bootstrap_token_holder_stays_an_admin_and_cannot_be_removed,
    a_new_bootstrap_token_revokes_the_old_one,
    tokens_authenticate_with_the_users_group_rules,
    tokens_are_refused_when_unknown_revoked_expired_or_orphaned,
    token_listings_are_newest_first_and_per_user,
    computer_groups_round_trip_their_rules_and_users,
    group_members_are_evaluated_against_current_facts,
    audit_filters_by_actor_action_family_time_and_limit,
    job_targets_map_jobs_to_endpoints,
    connections_are_reused_by_target_and_keep_known_facts,
    connection_status_activity_and_time_outs,
    evidence_is_listed_newest_first_and_paged_by_hostnames,
    exports_move_through_their_states_and_list_newest_first,
    console_sessions_resolve_to_the_users_principal,
    console_sessions_end_on_sign_out_expiry_and_idleness,
    a_schedule_tick_has_one_batch,
    resolving_a_batch_fixes_its_endpoints_once,
    dispatching_an_item_creates_its_snapshot_once,
    settled_and_orphaned_items_follow_their_snapshots,
    batch_totals_count_items_by_state_with_bytes,
    batch_states_move_only_from_the_states_given,
    batch_listings_and_job_ids,
    schedules_are_unique_by_name_and_ticks_only_move_forward,
    kept_snapshots_are_marked_once_and_never_pruned,
    prune_candidates_follow_keep_last_and_keep_days_per_endpoint,
    enrollments_of_one_hostname_at_once_bind_one_agent,
    an_item_dispatched_many_times_at_once_gets_one_snapshot,
    racing_writers_of_one_row_see_one_winner,
    free_text_with_a_nul_is_stored_with_a_replacement_character,
    text_with_a_nul_from_an_agent_or_a_request_never_fails_a_statement,
    forgetting_an_endpoint_without_snapshots_closes_its_connections,
    starting_a_session_sweeps_ended_ones,
    disk_reservations_count_the_captures_in_flight,
    racing_disk_reservations_never_overcommit_the_store,
);

// --- helpers ---------------------------------------------------------------------------------

fn heartbeat(hostname: &str, ips: &[&str], labels: &[&str]) -> Heartbeat {
    Heartbeat {
        hostname: hostname.to_string(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        os: Some("linux".into()),
        agent_version: Some("1.0".into()),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        api_url: format!("https://{hostname}:7443"),
        cert_sha256: format!("cert-of-{hostname}"),
    }
}

/// An enrolled endpoint that has sent one heartbeat (so it is online).
async fn online(catalog: &Catalog, hostname: &str, ips: &[&str], labels: &[&str]) -> Endpoint {
    let hb = heartbeat(hostname, ips, labels);
    let nonce = format!("nonce-{hostname}");
    catalog
        .enroll(&hb, &nonce)
        .await
        .unwrap()
        .expect("a new hostname enrolls");
    catalog
        .heartbeat(&hb, &nonce)
        .await
        .unwrap()
        .expect("the enrolled agent's heartbeat is recorded")
}

fn verified(events: u64) -> Verified {
    Verified {
        events,
        oldest_ts: Some(1_000),
        newest_ts: Some(2_000),
        hostname: None,
    }
}

/// A complete captured snapshot of `endpoint` named `name`, of `size` bytes.
async fn complete(catalog: &Catalog, endpoint: i64, name: &str, size: i64) -> i64 {
    let id = catalog
        .create_snapshot(endpoint, Origin::Capture, "alice")
        .await
        .unwrap();
    catalog
        .complete_snapshot(id, name, size, &format!("sha-{name}"), &verified(7))
        .await
        .unwrap();
    id
}

fn rules(hostnames: &[&str], cidrs: &[&str], labels: &[&str], members: &[&str]) -> GroupRules {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    GroupRules {
        hostnames: v(hostnames),
        cidrs: v(cidrs),
        labels: v(labels),
        members: v(members),
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn new_batch(group: &str, schedule: Option<(i64, &str, i64)>) -> NewBatch {
    NewBatch {
        group_name: group.to_string(),
        schedule: schedule.map(|(id, name, tick)| (id, name.to_string(), tick)),
        max_concurrency: 4,
        expire_at_ms: now_ms() + 3_600_000,
        failure_limit: Some("50%".into()),
        requested_by: "alice".into(),
    }
}

fn schedule(name: &str, group: &str) -> Schedule {
    Schedule {
        id: 0,
        name: name.to_string(),
        cron: "0 2 * * *".into(),
        tz: "UTC".into(),
        group_name: group.to_string(),
        max_concurrency: 8,
        expire_secs: 3_600,
        failure_limit: None,
        keep_last: Some(3),
        keep_days: None,
        paused: false,
        created_by: "alice".into(),
        created_ms: 0,
        last_tick_ms: None,
    }
}

fn hostnames(endpoints: &[Endpoint]) -> Vec<&str> {
    endpoints.iter().map(|e| e.hostname.as_str()).collect()
}

// --- endpoints -------------------------------------------------------------------------------

async fn enrollment_binds_a_hostname_once_until_rekeyed(catalog: Catalog) {
    let hb = heartbeat("web-01", &["10.0.0.1"], &["prod"]);
    let first = catalog.enroll(&hb, "n1").await.unwrap().expect("enrolls");
    assert_eq!(first.hostname, "web-01");
    assert_eq!(first.ips, strings(&["10.0.0.1"]));
    assert_eq!(first.labels, strings(&["prod"]));
    assert_eq!(first.cert_sha256.as_deref(), Some("cert-of-web-01"));
    assert!(first.is_enrolled());
    assert_eq!(first.enrolled_ms, Some(first.created_ms));
    assert_eq!(
        first.last_seen_ms, None,
        "not online before a heartbeat proves the credential"
    );

    let mut thief = hb.clone();
    thief.cert_sha256 = "another-cert".into();
    assert!(
        catalog.enroll(&thief, "n2").await.unwrap().is_none(),
        "a bound hostname does not enroll again"
    );
    let stored = catalog.endpoint("web-01").await.unwrap().unwrap();
    assert_eq!(stored.cert_sha256.as_deref(), Some("cert-of-web-01"));
    assert_eq!(stored.identity_nonce.as_deref(), Some("n1"));

    assert!(catalog.rekey_endpoint("web-01").await.unwrap());
    assert!(!catalog.rekey_endpoint("nobody").await.unwrap());
    let unbound = catalog.endpoint("web-01").await.unwrap().unwrap();
    assert!(!unbound.is_enrolled());
    assert_eq!(unbound.cert_sha256, None);
    assert_eq!(unbound.enrolled_ms, None);

    let again = catalog
        .enroll(&thief, "n2")
        .await
        .unwrap()
        .expect("a re-keyed hostname enrolls anew");
    assert_eq!(again.id, first.id, "the same endpoint row");
    assert_eq!(again.cert_sha256.as_deref(), Some("another-cert"));
    assert_eq!(
        catalog
            .endpoint_by_id(first.id)
            .await
            .unwrap()
            .unwrap()
            .hostname,
        "web-01"
    );
    assert!(
        catalog
            .endpoint_by_id(first.id + 1000)
            .await
            .unwrap()
            .is_none()
    );
}

async fn heartbeats_need_the_enrolled_nonce_and_keep_the_pinned_certificate(catalog: Catalog) {
    let hb = heartbeat("db-01", &["10.0.0.2"], &[]);
    catalog.enroll(&hb, "right").await.unwrap().unwrap();
    assert!(
        catalog.heartbeat(&hb, "wrong").await.unwrap().is_none(),
        "a heartbeat with another credential is not recorded"
    );
    assert_eq!(
        catalog
            .endpoint("db-01")
            .await
            .unwrap()
            .unwrap()
            .last_seen_ms,
        None
    );

    let mut moved = heartbeat("db-01", &["10.9.9.9", "fd00::9"], &["db", "prod"]);
    moved.os = None;
    moved.api_url = "https://10.9.9.9:7443".into();
    moved.cert_sha256 = "a-new-cert".into();
    let before = now_ms();
    let seen = catalog.heartbeat(&moved, "right").await.unwrap().unwrap();
    assert!(seen.last_seen_ms.unwrap() >= before);
    assert_eq!(seen.ips, strings(&["10.9.9.9", "fd00::9"]));
    assert_eq!(seen.labels, strings(&["db", "prod"]));
    assert_eq!(seen.os, None, "facts are replaced, absent ones too");
    assert_eq!(seen.api_url.as_deref(), Some("https://10.9.9.9:7443"));
    assert_eq!(
        seen.cert_sha256.as_deref(),
        Some("cert-of-db-01"),
        "the pinned certificate never changes on a heartbeat"
    );

    assert!(
        catalog
            .heartbeat(&heartbeat("unknown", &[], &[]), "right")
            .await
            .unwrap()
            .is_none()
    );
}

async fn forgetting_an_endpoint_keeps_it_only_while_snapshots_belong_to_it(catalog: Catalog) {
    online(&catalog, "lonely", &[], &[]).await;
    let kept = online(&catalog, "evidence-holder", &[], &[]).await;
    complete(&catalog, kept.id, "evidence-holder-1", 10).await;

    assert!(catalog.forget_endpoint("lonely").await.unwrap());
    assert!(catalog.endpoint("lonely").await.unwrap().is_none());

    assert!(catalog.forget_endpoint("evidence-holder").await.unwrap());
    let offline = catalog
        .endpoint("evidence-holder")
        .await
        .unwrap()
        .expect("an endpoint with snapshots stays");
    assert!(!offline.is_enrolled());
    assert_eq!(offline.api_url, None);
    assert_eq!(offline.last_seen_ms, None);
    assert_eq!(offline.cert_sha256, None);
    assert_eq!(
        catalog
            .snapshots(Some("evidence-holder"))
            .await
            .unwrap()
            .len(),
        1
    );

    assert!(!catalog.forget_endpoint("never-known").await.unwrap());
}

async fn ensure_endpoint_creates_an_offline_endpoint_once(catalog: Catalog) {
    let first = catalog.ensure_endpoint("uploaded-01").await.unwrap();
    assert_eq!(first.hostname, "uploaded-01");
    assert!(first.ips.is_empty() && first.labels.is_empty());
    assert_eq!(first.api_url, None);
    assert!(!first.is_enrolled());
    let second = catalog.ensure_endpoint("uploaded-01").await.unwrap();
    assert_eq!(second.id, first.id);

    let enrolled = online(&catalog, "live-01", &["10.1.1.1"], &[]).await;
    let ensured = catalog.ensure_endpoint("live-01").await.unwrap();
    assert_eq!(ensured.id, enrolled.id);
    assert!(
        ensured.is_enrolled(),
        "an existing endpoint is left as it is"
    );
}

async fn search_finds_hostnames_and_addresses_with_prefix_matches_first(catalog: Catalog) {
    online(&catalog, "zeta-web", &["10.0.0.5"], &[]).await;
    online(&catalog, "Web-02", &["10.0.1.7"], &[]).await;
    online(&catalog, "alpha-web", &["192.168.1.10"], &[]).await;
    online(&catalog, "web-01", &["10.0.0.6"], &[]).await;
    online(&catalog, "db-01", &["192.168.1.11"], &[]).await;

    let all = catalog.search_endpoints("").await.unwrap();
    assert_eq!(
        hostnames(&all),
        ["Web-02", "alpha-web", "db-01", "web-01", "zeta-web"],
        "everything when empty, by hostname"
    );

    let web = catalog.search_endpoints("WEB").await.unwrap();
    assert_eq!(
        hostnames(&web),
        ["Web-02", "web-01", "alpha-web", "zeta-web"],
        "case-insensitive; hostnames that start with the text first"
    );

    let by_ip = catalog.search_endpoints("192.168.1.1").await.unwrap();
    assert_eq!(hostnames(&by_ip), ["alpha-web", "db-01"]);

    assert!(
        catalog
            .search_endpoints("nothing")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        catalog.search_endpoints("%").await.unwrap().is_empty(),
        "the text is matched literally"
    );
}

async fn search_facts_pages_follow_the_search_order(catalog: Catalog) {
    online(&catalog, "web-b", &["10.0.0.2"], &["prod"]).await;
    online(&catalog, "a-web", &["10.0.0.1"], &[]).await;
    online(&catalog, "web-a", &["10.0.0.3"], &["dev", "eu"]).await;
    online(&catalog, "other", &[], &[]).await;

    let first = catalog
        .search_endpoint_facts_page("web", 0, 2)
        .await
        .unwrap();
    assert_eq!(
        first,
        vec![
            (
                "web-a".to_string(),
                strings(&["10.0.0.3"]),
                strings(&["dev", "eu"])
            ),
            (
                "web-b".to_string(),
                strings(&["10.0.0.2"]),
                strings(&["prod"])
            ),
        ]
    );
    let second = catalog
        .search_endpoint_facts_page("web", 2, 2)
        .await
        .unwrap();
    assert_eq!(
        second,
        vec![("a-web".to_string(), strings(&["10.0.0.1"]), vec![])]
    );
    assert!(
        catalog
            .search_endpoint_facts_page("web", 3, 2)
            .await
            .unwrap()
            .is_empty()
    );

    let mut facts = catalog.endpoint_facts().await.unwrap();
    facts.sort();
    assert_eq!(facts.len(), 4);
    assert_eq!(
        facts[0],
        ("a-web".to_string(), strings(&["10.0.0.1"]), vec![])
    );
    assert_eq!(facts[1], ("other".to_string(), vec![], vec![]));
}

async fn metric_counts_count_endpoints_online_snapshots_connections_and_quarantine(
    catalog: Catalog,
) {
    let empty = catalog.metric_counts(0).await.unwrap();
    assert_eq!(
        (empty.endpoints, empty.online, empty.quarantined),
        (0, 0, 0)
    );
    assert!(empty.snapshots.is_empty() && empty.connections.is_empty());

    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    catalog.ensure_endpoint("offline").await.unwrap();
    complete(&catalog, web.id, "web-1", 5_000_000_000).await;
    complete(&catalog, db.id, "db-1", 250).await;
    let queued = catalog
        .create_snapshot(db.id, Origin::Capture, "bob")
        .await
        .unwrap();
    let failed = catalog
        .create_snapshot(db.id, Origin::Capture, "bob")
        .await
        .unwrap();
    catalog
        .fail_snapshot(failed, "agent offline")
        .await
        .unwrap();
    let _ = queued;
    let active = ConnectionAttempt {
        status: "active".into(),
        ..Default::default()
    };
    catalog
        .upsert_connection(web.id, "{\"t\":1}", "alice", &active)
        .await
        .unwrap();
    catalog
        .upsert_connection(db.id, "{\"t\":2}", "alice", &active)
        .await
        .unwrap();
    catalog
        .create_ingest("job-q", Origin::Upload, "x.db", "alice")
        .await
        .unwrap();
    catalog
        .quarantine_ingest("job-q", "not a recorder database", None)
        .await
        .unwrap();

    let counts = catalog.metric_counts(0).await.unwrap();
    assert_eq!(counts.endpoints, 3);
    assert_eq!(counts.online, 2, "the offline endpoint has no heartbeat");
    assert_eq!(counts.quarantined, 1);
    let snapshots: BTreeMap<String, (i64, i64)> = counts
        .snapshots
        .into_iter()
        .map(|(s, n, b)| (s, (n, b)))
        .collect();
    assert_eq!(
        snapshots,
        BTreeMap::from([
            ("complete".to_string(), (2, 5_000_000_250)),
            ("failed".to_string(), (1, 0)),
            ("queued".to_string(), (1, 0)),
        ]),
        "bytes are the sum of sizes, 0 where none is known"
    );
    assert_eq!(counts.connections, vec![("active".to_string(), 2)]);

    let later = catalog.metric_counts(now_ms() + 60_000).await.unwrap();
    assert_eq!(later.online, 0, "nobody was heard from after the cut-off");
}

// --- snapshots -------------------------------------------------------------------------------

async fn a_capture_moves_through_its_states_to_complete_with_its_facts(catalog: Catalog) {
    let ep = online(&catalog, "web-01", &["10.0.0.1"], &[]).await;
    let id = catalog
        .create_snapshot(ep.id, Origin::Capture, "alice")
        .await
        .unwrap();
    let queued = catalog.snapshot(id).await.unwrap().unwrap();
    assert_eq!(queued.state, "queued");
    assert_eq!(queued.origin, "capture");
    assert_eq!(queued.hostname, "web-01");
    assert_eq!(queued.requested_by, "alice");
    assert_eq!(queued.bytes_done, 0);
    assert_eq!(
        (
            queued.name.as_deref(),
            queued.size,
            queued.job_id.as_deref(),
            queued.completed_ms
        ),
        (None, None, None, None)
    );

    catalog.set_snapshot_job(id, "job-1").await.unwrap();
    catalog
        .set_snapshot_state(id, SnapshotState::Measuring)
        .await
        .unwrap();
    catalog
        .set_snapshot_staged(id, "stage-1", "web-01-2026", 4096)
        .await
        .unwrap();
    catalog
        .set_snapshot_state(id, SnapshotState::Transferring)
        .await
        .unwrap();
    catalog.set_snapshot_progress(id, 1024, 4096).await.unwrap();
    let moving = catalog.snapshot(id).await.unwrap().unwrap();
    assert_eq!(moving.state, "transferring");
    assert_eq!(moving.job_id.as_deref(), Some("job-1"));
    assert_eq!(moving.staged_id.as_deref(), Some("stage-1"));
    assert_eq!(moving.name.as_deref(), Some("web-01-2026"));
    assert_eq!((moving.bytes_done, moving.bytes_total), (1024, Some(4096)));

    catalog.set_snapshot_sha256(id, "abc123").await.unwrap();
    assert_eq!(
        catalog
            .snapshot(id)
            .await
            .unwrap()
            .unwrap()
            .sha256
            .as_deref(),
        Some("abc123")
    );
    catalog.clear_snapshot_staged(id).await.unwrap();
    let cleared = catalog.snapshot(id).await.unwrap().unwrap();
    assert_eq!((cleared.staged_id, cleared.bytes_done), (None, 0));
    catalog
        .set_snapshot_staged(id, "stage-2", "web-01-2026", 4096)
        .await
        .unwrap();
    assert_eq!(
        catalog.snapshot(id).await.unwrap().unwrap().sha256,
        None,
        "a new staged copy forgets the old sha256"
    );

    catalog
        .set_snapshot_state(id, SnapshotState::Verifying)
        .await
        .unwrap();
    assert!(
        catalog
            .complete_snapshot_by_sha256("abc123")
            .await
            .unwrap()
            .is_none()
    );
    catalog
        .complete_snapshot(
            id,
            "web-01-2026",
            4096,
            "abc123",
            &Verified {
                events: 42,
                oldest_ts: None,
                newest_ts: Some(99),
                hostname: None,
            },
        )
        .await
        .unwrap();
    let done = catalog.snapshot(id).await.unwrap().unwrap();
    assert_eq!(done.state, "complete");
    assert_eq!(done.size, Some(4096));
    assert_eq!((done.bytes_done, done.bytes_total), (4096, Some(4096)));
    assert_eq!(done.sha256.as_deref(), Some("abc123"));
    assert_eq!(done.events, Some(42));
    assert_eq!((done.oldest_ts, done.newest_ts), (None, Some(99)));
    assert_eq!(done.error, None);
    assert!(done.completed_ms.unwrap() >= done.created_ms);
    assert_eq!(
        catalog
            .complete_snapshot_by_sha256("abc123")
            .await
            .unwrap()
            .map(|s| s.id),
        Some(id)
    );
    assert_eq!(
        catalog
            .snapshot_by_name("web-01-2026")
            .await
            .unwrap()
            .map(|s| s.id),
        Some(id)
    );
    assert!(catalog.snapshot(id + 100).await.unwrap().is_none());
}

async fn failing_a_snapshot_keeps_finished_ones_as_they_are(catalog: Catalog) {
    let ep = online(&catalog, "web", &[], &[]).await;
    let running = catalog
        .create_snapshot(ep.id, Origin::Capture, "alice")
        .await
        .unwrap();
    catalog
        .set_snapshot_state(running, SnapshotState::Transferring)
        .await
        .unwrap();
    let done = complete(&catalog, ep.id, "web-1", 10).await;

    assert!(
        catalog
            .fail_unfinished_snapshot(running, "job cancelled")
            .await
            .unwrap()
    );
    let failed = catalog.snapshot(running).await.unwrap().unwrap();
    assert_eq!(failed.state, "failed");
    assert_eq!(failed.error.as_deref(), Some("job cancelled"));
    assert!(failed.completed_ms.is_some());
    assert!(
        !catalog
            .fail_unfinished_snapshot(running, "again")
            .await
            .unwrap(),
        "a failed snapshot stays failed with its first reason"
    );
    assert_eq!(
        catalog
            .snapshot(running)
            .await
            .unwrap()
            .unwrap()
            .error
            .as_deref(),
        Some("job cancelled")
    );
    assert!(
        !catalog
            .fail_unfinished_snapshot(done, "late")
            .await
            .unwrap()
    );
    assert_eq!(
        catalog.snapshot(done).await.unwrap().unwrap().state,
        "complete"
    );

    catalog
        .fail_snapshot(done, "store lost the file")
        .await
        .unwrap();
    let forced = catalog.snapshot(done).await.unwrap().unwrap();
    assert_eq!(
        (forced.state.as_str(), forced.error.as_deref()),
        ("failed", Some("store lost the file"))
    );
    catalog
        .set_snapshot_state(done, SnapshotState::Queued)
        .await
        .unwrap();
    assert_eq!(
        catalog.snapshot(done).await.unwrap().unwrap().error,
        None,
        "a new state clears the error"
    );
}

async fn unqueued_captures_are_queued_captures_without_a_job_outside_fleet_batches(
    catalog: Catalog,
) {
    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    let lost = catalog
        .create_snapshot(web.id, Origin::Capture, "alice")
        .await
        .unwrap();
    let linked = catalog
        .create_snapshot(web.id, Origin::Capture, "alice")
        .await
        .unwrap();
    catalog
        .set_snapshot_job(linked, "job-linked")
        .await
        .unwrap();
    let upload = catalog
        .create_snapshot(web.id, Origin::Upload, "alice")
        .await
        .unwrap();
    let started = catalog
        .create_snapshot(db.id, Origin::Capture, "bob")
        .await
        .unwrap();
    catalog
        .set_snapshot_state(started, SnapshotState::Measuring)
        .await
        .unwrap();
    let lost_too = catalog
        .create_snapshot(db.id, Origin::Capture, "bob")
        .await
        .unwrap();

    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    catalog
        .resolve_batch(batch, &[(db.id, "db".to_string())])
        .await
        .unwrap();
    let fleet_snapshot = catalog
        .dispatch_item(batch, db.id, "schedule")
        .await
        .unwrap()
        .unwrap();

    let _ = (upload, fleet_snapshot);
    assert_eq!(
        catalog.unqueued_captures().await.unwrap(),
        vec![
            (lost, Some("web".to_string()), "alice".to_string()),
            (lost_too, Some("db".to_string()), "bob".to_string()),
        ]
    );
}

async fn snapshot_listings_order_newest_first_and_page_by_id(catalog: Catalog) {
    let b = online(&catalog, "b-host", &["10.0.0.2"], &["prod"]).await;
    let a = online(&catalog, "a-host", &["10.0.0.1"], &[]).await;
    let mut ids = Vec::new();
    for (i, ep) in [a.id, b.id, a.id, b.id, a.id].into_iter().enumerate() {
        ids.push(complete(&catalog, ep, &format!("snap-{i}"), 10).await);
    }

    let all: Vec<(String, i64)> = catalog
        .snapshots(None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.hostname, s.id))
        .collect();
    assert_eq!(
        all,
        vec![
            ("a-host".to_string(), ids[4]),
            ("a-host".to_string(), ids[2]),
            ("a-host".to_string(), ids[0]),
            ("b-host".to_string(), ids[3]),
            ("b-host".to_string(), ids[1]),
        ],
        "by hostname, then newest first"
    );
    let of_b: Vec<i64> = catalog
        .snapshots(Some("b-host"))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(of_b, vec![ids[3], ids[1]]);
    assert!(catalog.snapshots(Some("nobody")).await.unwrap().is_empty());

    let page = |host: Option<&'static str>, before: Option<i64>, limit: Option<i64>| {
        let catalog = catalog.clone();
        async move {
            catalog
                .snapshots_page(host, before, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.snapshot.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(None, None, None).await,
        vec![ids[4], ids[3], ids[2], ids[1], ids[0]]
    );
    assert_eq!(page(None, None, Some(2)).await, vec![ids[4], ids[3]]);
    assert_eq!(
        page(None, Some(ids[3]), Some(2)).await,
        vec![ids[2], ids[1]]
    );
    assert_eq!(page(None, Some(ids[1]), Some(2)).await, vec![ids[0]]);
    assert_eq!(page(None, Some(ids[0]), Some(2)).await, Vec::<i64>::new());
    assert_eq!(
        page(Some("a-host"), Some(ids[4]), None).await,
        vec![ids[2], ids[0]]
    );
    assert_eq!(page(Some("nobody"), None, None).await, Vec::<i64>::new());

    let with_facts = catalog
        .snapshots_page(Some("b-host"), None, Some(1))
        .await
        .unwrap();
    assert_eq!(with_facts.len(), 1);
    assert_eq!(with_facts[0].endpoint_ips, strings(&["10.0.0.2"]));
    assert_eq!(with_facts[0].endpoint_labels, strings(&["prod"]));
    assert_eq!(with_facts[0].facts().hostname, "b-host");
}

async fn snapshot_endpoints_page_by_hostname(catalog: Catalog) {
    let mut ids = BTreeMap::new();
    for host in ["c", "a", "d", "b"] {
        let ep = online(&catalog, host, &[], &[host]).await;
        ids.insert(host, ep.id);
    }
    online(&catalog, "no-snapshots", &[], &[]).await;
    for host in ["c", "a", "d", "b"] {
        complete(&catalog, ids[host], &format!("{host}-1"), 1).await;
    }
    let hosts = |rows: Vec<(i64, String, Vec<String>, Vec<String>)>| {
        rows.into_iter().map(|r| r.1).collect::<Vec<_>>()
    };
    let first = catalog
        .snapshot_endpoints_page(None, None, 2)
        .await
        .unwrap();
    assert_eq!(
        first[0],
        (ids["a"], "a".to_string(), vec![], strings(&["a"]))
    );
    assert_eq!(hosts(first), ["a", "b"]);
    assert_eq!(
        hosts(
            catalog
                .snapshot_endpoints_page(Some("b"), None, 2)
                .await
                .unwrap()
        ),
        ["c", "d"]
    );
    assert!(
        catalog
            .snapshot_endpoints_page(Some("d"), None, 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        hosts(
            catalog
                .snapshot_endpoints_page(None, Some("c"), 10)
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert!(
        catalog
            .snapshot_endpoints_page(None, Some("no-snapshots"), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn snapshot_summaries_count_states_and_find_the_newest(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    let idle = online(&catalog, "idle", &[], &[]).await;
    complete(&catalog, web.id, "web-1", 1).await;
    complete(&catalog, web.id, "web-2", 1).await;
    let failed = catalog
        .create_snapshot(web.id, Origin::Capture, "a")
        .await
        .unwrap();
    catalog.fail_snapshot(failed, "x").await.unwrap();
    let newest = catalog
        .create_snapshot(web.id, Origin::Capture, "a")
        .await
        .unwrap();
    catalog
        .set_snapshot_state(newest, SnapshotState::Transferring)
        .await
        .unwrap();
    let db_only = complete(&catalog, db.id, "db-1", 1).await;

    let sums = catalog
        .snapshot_summaries(&[web.id, idle.id])
        .await
        .unwrap();
    assert_eq!(
        sums.len(),
        1,
        "only the endpoints asked for that have snapshots"
    );
    let s = &sums[&web.id];
    assert_eq!(s.hostname, "web");
    assert_eq!((s.snapshots, s.captures), (4, 2));
    assert_eq!(
        s.states,
        BTreeMap::from([
            ("complete".to_string(), 2),
            ("failed".to_string(), 1),
            ("transferring".to_string(), 1),
        ])
    );
    assert_eq!(s.latest_id, newest);
    let newest_ms = catalog.snapshot(newest).await.unwrap().unwrap().created_ms;
    assert_eq!(s.latest_ms, newest_ms);

    let both = catalog.snapshot_summaries(&[web.id, db.id]).await.unwrap();
    assert_eq!(both[&db.id].latest_id, db_only);
    assert!(catalog.snapshot_summaries(&[]).await.unwrap().is_empty());
}

async fn deleting_a_snapshot_says_whether_this_call_deleted_it(catalog: Catalog) {
    let ep = online(&catalog, "web", &[], &[]).await;
    let id = complete(&catalog, ep.id, "web-1", 1).await;
    catalog.keep_snapshot(id, "alice").await.unwrap();
    assert!(catalog.delete_snapshot(id).await.unwrap());
    assert!(!catalog.delete_snapshot(id).await.unwrap());
    assert!(catalog.snapshot(id).await.unwrap().is_none());
    assert!(
        catalog.keep_mark(id).await.unwrap().is_none(),
        "the keep mark goes with it"
    );
    let next = complete(&catalog, ep.id, "web-2", 1).await;
    assert!(next > id, "snapshot ids are never reused");
}

async fn uploaded_snapshots_are_found_by_name_and_content(catalog: Catalog) {
    let ep = catalog.ensure_endpoint("laptop").await.unwrap();
    let id = catalog
        .insert_complete_snapshot(
            ep.id,
            Origin::Upload,
            "laptop-2026",
            2048,
            "feed",
            &verified(5),
            "job-up",
            "carol",
        )
        .await
        .unwrap();
    let s = catalog
        .snapshot_by_name("laptop-2026")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.id, id);
    assert_eq!(
        (s.state.as_str(), s.origin.as_str()),
        ("complete", "upload")
    );
    assert_eq!(
        (s.size, s.bytes_done, s.bytes_total),
        (Some(2048), 2048, Some(2048))
    );
    assert_eq!(s.events, Some(5));
    assert_eq!((s.oldest_ts, s.newest_ts), (Some(1_000), Some(2_000)));
    assert_eq!(s.job_id.as_deref(), Some("job-up"));
    assert_eq!(s.requested_by, "carol");
    assert_eq!(s.completed_ms, Some(s.created_ms));

    let dup = catalog
        .insert_complete_snapshot(
            ep.id,
            Origin::Watch,
            "laptop-2026-b",
            2048,
            "feed",
            &verified(5),
            "job-w",
            "system",
        )
        .await
        .unwrap();
    assert_eq!(
        catalog
            .complete_snapshot_by_sha256("feed")
            .await
            .unwrap()
            .map(|s| s.id),
        Some(id),
        "the oldest complete snapshot with that content"
    );
    assert_eq!(
        catalog.snapshot(dup).await.unwrap().unwrap().origin,
        "watch"
    );
    let taken = catalog
        .insert_complete_snapshot(
            ep.id,
            Origin::Upload,
            "laptop-2026",
            1,
            "other",
            &verified(1),
            "job-x",
            "carol",
        )
        .await;
    assert!(taken.is_err(), "snapshot names are unique");
    assert!(catalog.snapshot_by_name("missing").await.unwrap().is_none());
}

// --- ingests ---------------------------------------------------------------------------------

async fn ingests_record_how_they_ended_and_retry_only_after_failing(catalog: Catalog) {
    catalog
        .create_ingest("job-1", Origin::Watch, "web.db", "system")
        .await
        .unwrap();
    let pending = catalog.ingest("job-1").await.unwrap().unwrap();
    assert_eq!(
        (
            pending.state.as_str(),
            pending.origin.as_str(),
            pending.original_name.as_str()
        ),
        ("pending", "watch", "web.db")
    );
    assert_eq!(
        (pending.snapshot_id, pending.finished_ms, pending.reason),
        (None, None, None)
    );

    catalog
        .finish_ingest("job-1", "duplicate", Some(7), Some("same as 7"))
        .await
        .unwrap();
    let dup = catalog.ingest("job-1").await.unwrap().unwrap();
    assert_eq!(dup.state, "duplicate");
    assert_eq!(dup.snapshot_id, Some(7));
    assert_eq!(dup.reason.as_deref(), Some("same as 7"));
    assert!(dup.finished_ms.is_some());
    catalog
        .create_ingest("job-1", Origin::Watch, "web.db", "system")
        .await
        .unwrap();
    assert_eq!(
        catalog.ingest("job-1").await.unwrap().unwrap().state,
        "duplicate",
        "a finished ingest is not restarted"
    );

    catalog
        .create_ingest("job-2", Origin::Upload, "up.db", "alice")
        .await
        .unwrap();
    assert!(catalog.fail_pending_ingest("job-2", "dead").await.unwrap());
    assert!(!catalog.fail_pending_ingest("job-2", "again").await.unwrap());
    let failed = catalog.ingest("job-2").await.unwrap().unwrap();
    assert_eq!(
        (failed.state.as_str(), failed.reason.as_deref()),
        ("failed", Some("dead"))
    );
    catalog
        .create_ingest("job-2", Origin::Upload, "up.db", "alice")
        .await
        .unwrap();
    let retried = catalog.ingest("job-2").await.unwrap().unwrap();
    assert_eq!(
        (retried.state.as_str(), retried.reason, retried.finished_ms),
        ("pending", None, None),
        "a failed ingest starts again"
    );
    assert!(!catalog.fail_pending_ingest("job-1", "x").await.unwrap());
    assert!(catalog.ingest("unknown").await.unwrap().is_none());
}

async fn quarantine_lists_open_entries_newest_first_and_closes_once(catalog: Catalog) {
    for job in ["q-1", "q-2", "q-3"] {
        catalog
            .create_ingest(job, Origin::Watch, &format!("{job}.db"), "system")
            .await
            .unwrap();
    }
    catalog
        .quarantine_ingest("q-1", "bad header", Some(std::path::Path::new("/q/q-1.db")))
        .await
        .unwrap();
    catalog
        .quarantine_ingest("q-2", "truncated", None)
        .await
        .unwrap();
    let open = catalog.quarantined(None).await.unwrap();
    let mut jobs: Vec<&str> = open.iter().map(|i| i.job_id.as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, ["q-1", "q-2"]);
    assert!(
        open.windows(2)
            .all(|w| w[0].finished_ms >= w[1].finished_ms)
    );
    let q1 = open.iter().find(|i| i.job_id == "q-1").unwrap();
    assert_eq!(q1.quarantine_path.as_deref(), Some("/q/q-1.db"));
    assert_eq!(q1.reason.as_deref(), Some("bad header"));
    assert_eq!(
        open.iter()
            .find(|i| i.job_id == "q-2")
            .unwrap()
            .quarantine_path,
        None
    );

    let cut = q1.finished_ms.unwrap();
    let older = catalog.quarantined(Some(cut)).await.unwrap();
    assert!(older.iter().all(|i| i.finished_ms.unwrap() < cut));
    assert!(
        catalog
            .quarantined(Some(cut + 1))
            .await
            .unwrap()
            .iter()
            .any(|i| i.job_id == "q-1")
    );

    assert!(catalog.close_quarantine("q-1", "retried").await.unwrap());
    assert!(!catalog.close_quarantine("q-1", "deleted").await.unwrap());
    assert!(!catalog.close_quarantine("q-3", "deleted").await.unwrap());
    assert_eq!(
        catalog.ingest("q-1").await.unwrap().unwrap().state,
        "retried"
    );
    let left: Vec<String> = catalog
        .quarantined(None)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.job_id)
        .collect();
    assert_eq!(left, ["q-2"]);
}

// --- users and tokens ------------------------------------------------------------------------

async fn users_have_roles_groups_passwords_and_token_counts(catalog: Catalog) {
    catalog
        .add_group("web", &rules(&["web-*"], &[], &[], &[]))
        .await
        .unwrap();
    catalog
        .add_group("db", &rules(&[], &["10.0.0.0/8"], &[], &[]))
        .await
        .unwrap();
    let bob = catalog
        .add_user("bob", Role::Operator, &strings(&["web", "db"]))
        .await
        .unwrap();
    assert_eq!(bob.name, "bob");
    assert_eq!(bob.role, Role::Operator);
    assert_eq!(bob.groups, strings(&["db", "web"]), "groups by name");
    assert_eq!(bob.tokens, 0);
    assert!(!bob.has_password);
    catalog.add_user("alice", Role::Admin, &[]).await.unwrap();

    let dup = catalog.add_user("bob", Role::Viewer, &[]).await;
    assert!(matches!(dup, Err(CatalogError::Conflict(_))), "{dup:?}");
    assert!(matches!(
        catalog.add_user("bad name!", Role::Viewer, &[]).await,
        Err(CatalogError::Invalid(_))
    ));

    let users = catalog.users().await.unwrap();
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(users[0].groups.is_empty());

    catalog.set_role("bob", Role::Viewer).await.unwrap();
    assert_eq!(
        catalog.user("bob").await.unwrap().unwrap().role,
        Role::Viewer
    );
    assert!(matches!(
        catalog.set_role("nobody", Role::Viewer).await,
        Err(CatalogError::NotFound(_))
    ));

    catalog.grant("alice", "web").await.unwrap();
    catalog.grant("alice", "web").await.unwrap();
    assert_eq!(
        catalog.user("alice").await.unwrap().unwrap().groups,
        strings(&["web"])
    );
    assert!(matches!(
        catalog.grant("alice", "nope").await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        catalog.grant("nobody", "web").await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(catalog.revoke_group("bob", "web").await.unwrap());
    assert!(!catalog.revoke_group("bob", "web").await.unwrap());
    assert!(matches!(
        catalog.revoke_group("nobody", "web").await,
        Err(CatalogError::NotFound(_))
    ));
    assert_eq!(
        catalog.user("bob").await.unwrap().unwrap().groups,
        strings(&["db"])
    );

    assert_eq!(catalog.password_hash("bob").await.unwrap(), None);
    catalog
        .set_password_hash("bob", "$argon2id$v=19$stub")
        .await
        .unwrap();
    assert_eq!(
        catalog.password_hash("bob").await.unwrap().as_deref(),
        Some("$argon2id$v=19$stub")
    );
    assert!(catalog.user("bob").await.unwrap().unwrap().has_password);
    assert_eq!(catalog.password_hash("nobody").await.unwrap(), None);
    assert!(matches!(
        catalog.set_password_hash("nobody", "x").await,
        Err(CatalogError::NotFound(_))
    ));

    let now = now_ms();
    catalog
        .create_token("bob", Some("ci"), "sq_a", "sha-a", None)
        .await
        .unwrap();
    catalog
        .create_token("bob", None, "sq_b", "sha-b", Some(now + 3_600_000))
        .await
        .unwrap();
    catalog
        .create_token("bob", None, "sq_c", "sha-c", Some(now - 1))
        .await
        .unwrap();
    let revoked = catalog
        .create_token("bob", None, "sq_d", "sha-d", None)
        .await
        .unwrap();
    catalog.revoke_token(revoked.id, "leaked").await.unwrap();
    assert_eq!(
        catalog.user("bob").await.unwrap().unwrap().tokens,
        2,
        "expired and revoked tokens do not count"
    );
    assert!(catalog.user("nobody").await.unwrap().is_none());
}

async fn adding_a_user_with_an_unknown_group_adds_nothing(catalog: Catalog) {
    let refused = catalog
        .add_user("dave", Role::Viewer, &strings(&["missing"]))
        .await;
    assert!(
        matches!(refused, Err(CatalogError::NotFound(_))),
        "{refused:?}"
    );
    assert!(catalog.user("dave").await.unwrap().is_none());
    catalog.add_user("dave", Role::Viewer, &[]).await.unwrap();
}

async fn removing_a_user_revokes_their_tokens_with_the_reason(catalog: Catalog) {
    catalog.add_user("erin", Role::Operator, &[]).await.unwrap();
    let token = catalog
        .create_token("erin", Some("laptop"), "sq_e", "sha-erin", None)
        .await
        .unwrap();
    catalog.remove_user("erin").await.unwrap();
    assert!(catalog.user("erin").await.unwrap().is_none());
    let t = catalog.token(token.id).await.unwrap().unwrap();
    assert!(t.revoked_ms.is_some());
    assert_eq!(
        t.revoked_reason.as_deref(),
        Some("its user erin was removed")
    );
    assert!(matches!(
        catalog.authenticate("sha-erin").await.unwrap(),
        Err(TokenRefusal::Revoked { reason: Some(r), .. }) if r == "its user erin was removed"
    ));
    assert!(matches!(
        catalog.remove_user("erin").await,
        Err(CatalogError::NotFound(_))
    ));
}

async fn the_bootstrap_token_holder_stays_an_admin_and_cannot_be_removed(catalog: Catalog) {
    assert_eq!(
        catalog
            .ensure_bootstrap_token("boot-1", "sq_boot")
            .await
            .unwrap(),
        0
    );
    let admin = catalog.user("admin").await.unwrap().unwrap();
    assert_eq!(admin.role, Role::Admin);
    assert_eq!(admin.tokens, 1);
    assert!(matches!(
        catalog.set_role("admin", Role::Operator).await,
        Err(CatalogError::Conflict(_))
    ));
    catalog.set_role("admin", Role::Admin).await.unwrap();
    assert!(matches!(
        catalog.remove_user("admin").await,
        Err(CatalogError::Conflict(_))
    ));
    assert!(catalog.user("admin").await.unwrap().is_some());

    let tokens = catalog.tokens(Some("admin")).await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].bootstrap);
    assert_eq!(tokens[0].label.as_deref(), Some("admin.token"));
    assert_eq!(tokens[0].prefix, "sq_boot");

    let principal = catalog.authenticate("boot-1").await.unwrap().unwrap();
    assert_eq!(principal.name, "admin");
    assert_eq!(principal.role, Role::Admin);
    assert!(principal.groups.is_empty());

    catalog.revoke_token(tokens[0].id, "rotated").await.unwrap();
    catalog.set_role("admin", Role::Viewer).await.unwrap();
    catalog.remove_user("admin").await.unwrap();
}

async fn a_new_bootstrap_token_revokes_the_old_one(catalog: Catalog) {
    catalog.add_user("admin", Role::Viewer, &[]).await.unwrap();
    catalog
        .ensure_bootstrap_token("boot-1", "sq_1")
        .await
        .unwrap();
    assert_eq!(
        catalog.user("admin").await.unwrap().unwrap().role,
        Role::Admin,
        "an existing admin user is made an admin"
    );
    assert_eq!(
        catalog
            .ensure_bootstrap_token("boot-1", "sq_1")
            .await
            .unwrap(),
        0,
        "the same file again changes nothing"
    );
    assert_eq!(
        catalog
            .ensure_bootstrap_token("boot-2", "sq_2")
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        catalog.authenticate("boot-1").await.unwrap(),
        Err(TokenRefusal::Revoked { reason: Some(r), .. }) if r == "admin.token was replaced"
    ));
    assert!(catalog.authenticate("boot-2").await.unwrap().is_ok());

    let old = catalog
        .tokens(Some("admin"))
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.prefix == "sq_1")
        .unwrap();
    assert!(old.revoked_ms.is_some());
    assert_eq!(
        catalog
            .ensure_bootstrap_token("boot-1", "sq_1")
            .await
            .unwrap(),
        1,
        "going back to the old file revokes the newer one"
    );
    assert!(catalog.authenticate("boot-1").await.unwrap().is_ok());
    assert_eq!(catalog.tokens(None).await.unwrap().len(), 2);
}

async fn tokens_authenticate_with_the_users_group_rules(catalog: Catalog) {
    let web = rules(&["web-*"], &["10.1.0.0/16"], &["prod"], &["db-07"]);
    let empty = GroupRules::default();
    catalog.add_group("web", &web).await.unwrap();
    catalog.add_group("none", &empty).await.unwrap();
    catalog
        .add_user("frank", Role::Operator, &strings(&["web", "none"]))
        .await
        .unwrap();
    let info = catalog
        .create_token("frank", Some("cli"), "sq_f", "sha-frank", None)
        .await
        .unwrap();
    assert_eq!(info.user, "frank");
    assert_eq!(info.label.as_deref(), Some("cli"));
    assert!(!info.bootstrap);
    assert_eq!(info.last_used_ms, None);

    let before = now_ms();
    let p = catalog.authenticate("sha-frank").await.unwrap().unwrap();
    assert_eq!(p.token_id, info.id);
    assert_eq!(p.name, "frank");
    assert_eq!(p.role, Role::Operator);
    let mut groups = p.groups.clone();
    groups.sort_by(|a, b| a.hostnames.cmp(&b.hostnames));
    assert_eq!(groups, vec![empty.clone(), web.clone()]);

    let used = catalog
        .token(info.id)
        .await
        .unwrap()
        .unwrap()
        .last_used_ms
        .expect("last use recorded");
    assert!(used >= before);
    catalog.authenticate("sha-frank").await.unwrap().unwrap();
    assert_eq!(
        catalog.token(info.id).await.unwrap().unwrap().last_used_ms,
        Some(used),
        "written at most once a minute"
    );

    catalog.add_user("gina", Role::Viewer, &[]).await.unwrap();
    catalog
        .create_token("gina", None, "sq_g", "sha-gina", None)
        .await
        .unwrap();
    let g = catalog.authenticate("sha-gina").await.unwrap().unwrap();
    assert_eq!(g.role, Role::Viewer);
    assert!(g.groups.is_empty(), "no groups is an empty list");

    assert!(matches!(
        catalog
            .create_token("nobody", None, "sq_n", "sha-n", None)
            .await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        catalog
            .create_token("frank", Some("bad\nlabel"), "sq_x", "sha-x", None)
            .await,
        Err(CatalogError::Invalid(_))
    ));
    assert!(
        catalog
            .create_token("gina", None, "sq_g2", "sha-frank", None)
            .await
            .is_err(),
        "token hashes are unique"
    );
}

async fn tokens_are_refused_when_unknown_revoked_expired_or_orphaned(catalog: Catalog) {
    catalog.add_user("hank", Role::Viewer, &[]).await.unwrap();
    let now = now_ms();
    assert_eq!(
        catalog
            .authenticate("never-issued")
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::Unknown
    );

    let expiring = catalog
        .create_token("hank", None, "sq_1", "sha-expired", Some(now - 5))
        .await
        .unwrap();
    assert_eq!(expiring.expires_ms, Some(now - 5));
    assert_eq!(
        catalog
            .authenticate("sha-expired")
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::Expired { when: now - 5 }
    );
    assert_eq!(
        catalog
            .token(expiring.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_ms,
        None,
        "a refused token is not marked used"
    );
    catalog
        .create_token("hank", None, "sq_2", "sha-later", Some(now + 60_000))
        .await
        .unwrap();
    assert!(catalog.authenticate("sha-later").await.unwrap().is_ok());

    let t = catalog
        .create_token("hank", None, "sq_3", "sha-revoked", None)
        .await
        .unwrap();
    assert!(catalog.revoke_token(t.id, "left the team").await.unwrap());
    assert!(!catalog.revoke_token(t.id, "twice").await.unwrap());
    let revoked = catalog.token(t.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_reason.as_deref(), Some("left the team"));
    match catalog.authenticate("sha-revoked").await.unwrap() {
        Err(TokenRefusal::Revoked { when, reason }) => {
            assert_eq!(Some(when), revoked.revoked_ms);
            assert_eq!(reason.as_deref(), Some("left the team"));
        }
        other => panic!("expected a revoked refusal, got {other:?}"),
    }
    assert!(!catalog.revoke_token(t.id + 100, "unknown").await.unwrap());
}

async fn token_listings_are_newest_first_and_per_user(catalog: Catalog) {
    catalog.add_user("ivy", Role::Viewer, &[]).await.unwrap();
    catalog.add_user("jack", Role::Viewer, &[]).await.unwrap();
    let a = catalog
        .create_token("ivy", None, "sq_a", "h-a", None)
        .await
        .unwrap();
    let b = catalog
        .create_token("jack", None, "sq_b", "h-b", None)
        .await
        .unwrap();
    let c = catalog
        .create_token("ivy", Some("two"), "sq_c", "h-c", Some(now_ms() + 1000))
        .await
        .unwrap();
    let ids = |list: Vec<snapq_core::catalog::TokenInfo>| {
        list.into_iter().map(|t| t.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(catalog.tokens(None).await.unwrap()),
        vec![c.id, b.id, a.id]
    );
    assert_eq!(
        ids(catalog.tokens(Some("ivy")).await.unwrap()),
        vec![c.id, a.id]
    );
    assert!(catalog.tokens(Some("nobody")).await.unwrap().is_empty());
    assert!(catalog.token(c.id + 10).await.unwrap().is_none());
}

// --- computer groups -------------------------------------------------------------------------

async fn computer_groups_round_trip_their_rules_and_users(catalog: Catalog) {
    let web = rules(
        &["web-*", "WWW-?"],
        &["10.0.0.0/8", "fd00::/8"],
        &["prod"],
        &["db-01"],
    );
    let made = catalog.add_group("web", &web).await.unwrap();
    assert_eq!(made.rules, web);
    assert!(made.users.is_empty());
    catalog
        .add_group("all", &rules(&["*"], &[], &[], &[]))
        .await
        .unwrap();
    assert!(matches!(
        catalog.add_group("web", &GroupRules::default()).await,
        Err(CatalogError::Conflict(_))
    ));
    assert!(matches!(
        catalog
            .add_group("bad", &rules(&[], &["10.0.0.0/99"], &[], &[]))
            .await,
        Err(CatalogError::Invalid(_))
    ));
    catalog
        .add_user("zoe", Role::Viewer, &strings(&["web"]))
        .await
        .unwrap();
    catalog
        .add_user("amy", Role::Viewer, &strings(&["web"]))
        .await
        .unwrap();

    let groups = catalog.groups().await.unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["all", "web"]);
    let got = catalog.group("web").await.unwrap().unwrap();
    assert_eq!(got.rules, web);
    assert_eq!(got.users, strings(&["amy", "zoe"]));
    assert!(catalog.group("nope").await.unwrap().is_none());

    catalog.remove_group("web").await.unwrap();
    assert!(catalog.group("web").await.unwrap().is_none());
    assert!(
        catalog
            .user("zoe")
            .await
            .unwrap()
            .unwrap()
            .groups
            .is_empty(),
        "its grants go with it"
    );
    assert!(matches!(
        catalog.remove_group("web").await,
        Err(CatalogError::NotFound(_))
    ));
}

async fn group_members_are_evaluated_against_current_facts(catalog: Catalog) {
    online(&catalog, "web-01", &["192.168.0.1"], &[]).await;
    online(&catalog, "db-01", &["10.1.2.3"], &[]).await;
    online(&catalog, "misc", &["172.16.0.1"], &["prod"]).await;
    online(&catalog, "other", &["172.16.0.2"], &[]).await;
    let members = catalog
        .members(&rules(&["web-*"], &["10.0.0.0/8"], &["prod"], &[]))
        .await
        .unwrap();
    assert_eq!(hostnames(&members), ["db-01", "misc", "web-01"]);
    assert!(
        catalog
            .members(&GroupRules::default())
            .await
            .unwrap()
            .is_empty()
    );
}

// --- audit -----------------------------------------------------------------------------------

async fn audit_filters_by_actor_action_family_time_and_limit(catalog: Catalog) {
    let entries = [
        ("alice", "user.add", "bob"),
        ("alice", "user.remove", "bob"),
        ("bob", "capture", "web-01"),
        ("system", "users.sync", "x"),
        ("alice", "user", "plain"),
    ];
    for (actor, action, target) in entries {
        catalog
            .audit(actor, action, target, "ok", None)
            .await
            .unwrap();
    }
    catalog
        .audit("bob", "capture", "db-01", "refused", Some("out of scope"))
        .await
        .unwrap();

    let all = catalog
        .audit_list(&AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert!(
        all.windows(2)
            .all(|w| (w[0].ts_ms, w[0].id) > (w[1].ts_ms, w[1].id)),
        "newest first"
    );
    assert_eq!(all[0].target, "db-01");
    assert_eq!(all[0].result, "refused");
    assert_eq!(all[0].detail.as_deref(), Some("out of scope"));
    assert_eq!(all[1].detail, None);

    let actions = |filter: AuditFilter| {
        let catalog = catalog.clone();
        async move {
            let mut list: Vec<String> = catalog
                .audit_list(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|e| format!("{}:{}", e.action, e.target))
                .collect();
            list.sort();
            list
        }
    };
    assert_eq!(
        actions(AuditFilter {
            action: Some("user".into()),
            limit: 100,
            ..Default::default()
        })
        .await,
        ["user.add:bob", "user.remove:bob", "user:plain"],
        "the family before a dot, not other actions that start alike"
    );
    assert_eq!(
        actions(AuditFilter {
            action: Some("user.add".into()),
            limit: 100,
            ..Default::default()
        })
        .await,
        ["user.add:bob"]
    );
    assert_eq!(
        actions(AuditFilter {
            actor: Some("bob".into()),
            limit: 100,
            ..Default::default()
        })
        .await,
        ["capture:db-01", "capture:web-01"]
    );

    let limited = catalog
        .audit_list(&AuditFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        limited.iter().map(|e| e.id).collect::<Vec<_>>(),
        all[..2].iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(
        catalog
            .audit_list(&AuditFilter {
                limit: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        1,
        "a limit of 0 is taken as 1"
    );

    let middle = all[2].ts_ms;
    let since = catalog
        .audit_list(&AuditFilter {
            since_ms: Some(middle),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        since.len(),
        all.iter().filter(|e| e.ts_ms >= middle).count(),
        "since is inclusive"
    );
    let until = catalog
        .audit_list(&AuditFilter {
            until_ms: Some(middle),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        until.len(),
        all.iter().filter(|e| e.ts_ms < middle).count(),
        "until is exclusive"
    );
    assert!(
        catalog
            .audit_list(&AuditFilter {
                since_ms: Some(now_ms() + 60_000),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
}

async fn free_text_with_a_nul_is_stored_with_a_replacement_character(catalog: Catalog) {
    catalog
        .audit("alice", "login", "name\0with nul", "refused", Some("\0"))
        .await
        .unwrap();
    let entry = catalog
        .audit_list(&AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    // PostgreSQL's TEXT cannot hold NUL; both engines keep U+FFFD in its place.
    assert_eq!(entry.target, "name\u{FFFD}with nul");
    assert_eq!(entry.detail.as_deref(), Some("\u{FFFD}"));
}

/// What a text with a NUL reads back as: PostgreSQL's TEXT cannot hold NUL, so there the catalog
/// stores U+FFFD in its place; SQLite keeps what it was given.
fn as_stored(catalog: &Catalog, text: &str) -> String {
    if catalog.backend() == "postgres" {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_string()
    }
}

async fn text_with_a_nul_from_an_agent_or_a_request_never_fails_a_statement(catalog: Catalog) {
    let mut hb = heartbeat("web", &[], &[]);
    hb.os = Some("linux\0".into());
    catalog.enroll(&hb, "n").await.unwrap().unwrap();
    let seen = catalog.heartbeat(&hb, "n").await.unwrap().unwrap();
    assert!(seen.last_seen_ms.is_some(), "the agent comes online");
    assert_eq!(seen.os, Some(as_stored(&catalog, "linux\0")));

    let snap = catalog
        .create_snapshot(seen.id, Origin::Capture, "alice")
        .await
        .unwrap();
    catalog.fail_snapshot(snap, "agent said \0").await.unwrap();
    assert_eq!(
        catalog.snapshot(snap).await.unwrap().unwrap().error,
        Some(as_stored(&catalog, "agent said \0"))
    );
    catalog
        .create_ingest("job-nul", Origin::Upload, "up\0.db", "alice")
        .await
        .unwrap();
    assert_eq!(
        catalog
            .ingest("job-nul")
            .await
            .unwrap()
            .unwrap()
            .original_name,
        as_stored(&catalog, "up\0.db")
    );

    assert!(catalog.search_endpoints("we\0").await.unwrap().is_empty());
    assert!(
        catalog
            .search_endpoint_facts_page("\0", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(catalog.endpoint("web\0").await.unwrap().is_none());
    assert!(catalog.user("alice\0").await.unwrap().is_none());
    assert!(catalog.snapshots(Some("web\0")).await.unwrap().is_empty());
    assert!(catalog.snapshot_by_name("\0").await.unwrap().is_none());
    assert!(
        catalog
            .audit_list(&AuditFilter {
                actor: Some("alice\0".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
}

// --- job targets and connections -------------------------------------------------------------

async fn job_targets_map_jobs_to_endpoints(catalog: Catalog) {
    catalog.set_job_target("job-1", "web-01").await.unwrap();
    catalog.set_job_target("job-2", "db-01").await.unwrap();
    catalog.set_job_target("job-2", "db-02").await.unwrap();
    let targets = catalog
        .job_targets(&["job-1", "job-2", "job-3"])
        .await
        .unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets["job-1"], "web-01");
    assert_eq!(targets["job-2"], "db-02", "the last target recorded");
    assert!(catalog.job_targets(&[]).await.unwrap().is_empty());
}

async fn connections_are_reused_by_target_and_keep_known_facts(catalog: Catalog) {
    let web = online(&catalog, "web", &["10.0.0.1"], &["prod"]).await;
    let first = ConnectionAttempt {
        address: Some("10.0.0.1:7443".into()),
        status: "active".into(),
        reason: None,
        db_bytes: Some(1000),
        events: Some(10),
        oldest_ts: Some(1),
        newest_ts: Some(2),
    };
    let id = catalog
        .upsert_connection(web.id, "{\"endpoint\":\"web\"}", "alice", &first)
        .await
        .unwrap();
    let row = catalog.connection(id).await.unwrap().unwrap();
    assert_eq!(row.hostname, "web");
    assert_eq!(row.endpoint_ips, strings(&["10.0.0.1"]));
    assert_eq!(row.endpoint_labels, strings(&["prod"]));
    assert_eq!(row.address.as_deref(), Some("10.0.0.1:7443"));
    assert_eq!(row.status, "active");
    assert_eq!(row.created_by, "alice");
    assert_eq!(
        (row.db_bytes, row.events, row.oldest_ts, row.newest_ts),
        (Some(1000), Some(10), Some(1), Some(2))
    );
    assert_eq!(row.since_ms, row.created_ms);

    let failed = ConnectionAttempt {
        status: "failed".into(),
        reason: Some("unreachable".into()),
        ..Default::default()
    };
    let again = catalog
        .upsert_connection(web.id, "{\"endpoint\":\"web\"}", "bob", &failed)
        .await
        .unwrap();
    assert_eq!(again, id, "the same target is the same connection");
    let row = catalog.connection(id).await.unwrap().unwrap();
    assert_eq!(row.status, "failed");
    assert_eq!(row.reason.as_deref(), Some("unreachable"));
    assert_eq!(
        row.address.as_deref(),
        Some("10.0.0.1:7443"),
        "what is known stays when the attempt does not say"
    );
    assert_eq!((row.db_bytes, row.events), (Some(1000), Some(10)));
    assert_eq!(row.created_by, "alice");

    let other = catalog
        .upsert_connection(web.id, "{\"snapshot\":1}", "bob", &first)
        .await
        .unwrap();
    assert_ne!(other, id);
    assert!(catalog.connection(other + 100).await.unwrap().is_none());
}

async fn connection_status_activity_and_time_outs(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let active = ConnectionAttempt {
        status: "active".into(),
        ..Default::default()
    };
    let a = catalog
        .upsert_connection(web.id, "a", "alice", &active)
        .await
        .unwrap();
    let b = catalog
        .upsert_connection(web.id, "b", "alice", &active)
        .await
        .unwrap();
    let c = catalog
        .upsert_connection(web.id, "c", "alice", &active)
        .await
        .unwrap();

    let since_a = catalog.connection(a).await.unwrap().unwrap().since_ms;
    catalog
        .set_connection_status(a, "active", Some("still"))
        .await
        .unwrap();
    let same = catalog.connection(a).await.unwrap().unwrap();
    assert_eq!(same.since_ms, since_a, "same status, same since");
    assert_eq!(same.reason.as_deref(), Some("still"));
    catalog
        .set_connection_status(c, "closed", None)
        .await
        .unwrap();

    let open: Vec<i64> = catalog
        .connections(None)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(open, vec![a, b], "not closed, oldest first");
    let closed: Vec<i64> = catalog
        .connections(Some("closed"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(closed, vec![c]);
    assert!(
        catalog.connection(c).await.unwrap().is_some(),
        "closed ones are still found"
    );

    assert!(catalog.touch_connection(a).await.unwrap());
    assert!(!catalog.touch_connection(c).await.unwrap());
    assert_eq!(
        catalog.time_out_connections(60_000, "idle").await.unwrap(),
        0
    );
    assert_eq!(
        catalog.time_out_connections(-60_000, "idle").await.unwrap(),
        2,
        "every active connection is idle against a cut-off in the future"
    );
    let timed_out = catalog.connections(Some("timed_out")).await.unwrap();
    assert_eq!(timed_out.len(), 2);
    assert!(
        timed_out
            .iter()
            .all(|c| c.reason.as_deref() == Some("idle"))
    );
    assert!(!catalog.touch_connection(a).await.unwrap());
}

// --- evidence and exports --------------------------------------------------------------------

fn evidence(hostname: &str, event_id: i64) -> NewEvidence {
    NewEvidence {
        hostname: hostname.to_string(),
        event_type: "process".into(),
        event_id,
        event_ts: (event_id % 2 == 0).then_some(event_id * 1000),
        event: serde_json::json!({"pid": event_id, "cmd": "sh -c 'x'", "nested": {"a": [1, 2]}}),
        source_kind: "snapshot".into(),
        source_id: "42".into(),
        connection_id: None,
        note: Some(format!("note {event_id}")),
    }
}

async fn evidence_is_listed_newest_first_and_paged_by_hostnames(catalog: Catalog) {
    let ids = catalog
        .save_evidence(
            &[
                evidence("web", 1),
                evidence("db", 2),
                evidence("web", 3),
                evidence("mail", 4),
                evidence("web", 5),
            ],
            "alice",
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order");
    assert!(
        catalog
            .save_evidence(&[], "alice")
            .await
            .unwrap()
            .is_empty()
    );

    let one = catalog.evidence(ids[1]).await.unwrap().unwrap();
    assert_eq!(one.hostname, "db");
    assert_eq!(one.event_type, "process");
    assert_eq!((one.event_id, one.event_ts), (2, Some(2000)));
    assert_eq!(
        one.event,
        serde_json::json!({"pid": 2, "cmd": "sh -c 'x'", "nested": {"a": [1, 2]}})
    );
    assert_eq!(
        (one.source_kind.as_str(), one.source_id.as_str()),
        ("snapshot", "42")
    );
    assert_eq!(one.connection_id, None);
    assert_eq!(one.saved_by, "alice");
    assert_eq!(one.note.as_deref(), Some("note 2"));
    assert_eq!(
        catalog.evidence(ids[0]).await.unwrap().unwrap().event_ts,
        None
    );

    let all: Vec<i64> = catalog
        .evidence_list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(all, ids.iter().rev().copied().collect::<Vec<_>>());
    let web: Vec<i64> = catalog
        .evidence_list(Some("web"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(web, vec![ids[4], ids[2], ids[0]]);

    let page = |hosts: &[&str], after: i64, limit: u32| {
        let catalog = catalog.clone();
        let hosts = strings(hosts);
        async move {
            catalog
                .evidence_page(&hosts, after, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(&["web", "mail"], 0, 2).await, vec![ids[0], ids[2]]);
    assert_eq!(
        page(&["web", "mail"], ids[2], 2).await,
        vec![ids[3], ids[4]]
    );
    assert_eq!(page(&["web", "mail"], ids[4], 2).await, Vec::<i64>::new());
    assert_eq!(page(&[], 0, 10).await, Vec::<i64>::new());

    assert!(catalog.delete_evidence(ids[0]).await.unwrap());
    assert!(!catalog.delete_evidence(ids[0]).await.unwrap());
    assert!(catalog.evidence(ids[0]).await.unwrap().is_none());
}

async fn exports_move_through_their_states_and_list_newest_first(catalog: Catalog) {
    let new = |host: Option<&str>| NewExport {
        hostname: host.map(str::to_string),
        source: serde_json::json!({"snapshot": 7}),
        format: "csv".into(),
        filters: serde_json::json!(["process", {"pid": 1}]),
        requested_by: "alice".into(),
    };
    let a = catalog.create_export(&new(Some("web"))).await.unwrap();
    let b = catalog.create_export(&new(None)).await.unwrap();
    let queued = catalog.export(a).await.unwrap().unwrap();
    assert_eq!(queued.state, "queued");
    assert_eq!(queued.hostname.as_deref(), Some("web"));
    assert_eq!(queued.source, serde_json::json!({"snapshot": 7}));
    assert_eq!(queued.filters, serde_json::json!(["process", {"pid": 1}]));
    assert_eq!((queued.rows, queued.bytes, queued.job_id), (0, None, None));
    assert_eq!(catalog.export(b).await.unwrap().unwrap().hostname, None);

    catalog.set_export_rows(a, 5).await.unwrap();
    assert_eq!(
        catalog.export(a).await.unwrap().unwrap().rows,
        0,
        "rows count only while running"
    );
    catalog.set_export_job(a, "job-e").await.unwrap();
    assert!(catalog.start_export(a).await.unwrap());
    catalog.set_export_rows(a, 5).await.unwrap();
    let running = catalog.export(a).await.unwrap().unwrap();
    assert_eq!(
        (
            running.state.as_str(),
            running.rows,
            running.job_id.as_deref()
        ),
        ("running", 5, Some("job-e"))
    );
    catalog
        .complete_export(a, 9, 1234, "export-a.csv")
        .await
        .unwrap();
    let done = catalog.export(a).await.unwrap().unwrap();
    assert_eq!(done.state, "complete");
    assert_eq!((done.rows, done.bytes), (9, Some(1234)));
    assert_eq!(done.file_name.as_deref(), Some("export-a.csv"));
    assert!(done.finished_ms.is_some());
    assert!(
        !catalog
            .end_unfinished_export(a, ExportState::Failed, "late")
            .await
            .unwrap(),
        "a complete export stays complete"
    );
    assert!(
        catalog
            .end_unfinished_export(b, ExportState::Cancelled, "by alice")
            .await
            .unwrap()
    );
    let cancelled = catalog.export(b).await.unwrap().unwrap();
    assert_eq!(
        (cancelled.state.as_str(), cancelled.error.as_deref()),
        ("cancelled", Some("by alice"))
    );
    assert!(catalog.start_export(b).await.unwrap());
    let restarted = catalog.export(b).await.unwrap().unwrap();
    assert_eq!(
        (
            restarted.state.as_str(),
            restarted.error,
            restarted.finished_ms
        ),
        ("running", None, None)
    );
    assert!(!catalog.start_export(b + 100).await.unwrap());

    let c = catalog.create_export(&new(Some("db"))).await.unwrap();
    let listed: Vec<i64> = catalog
        .exports()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, vec![c, b, a]);
    let finished_a = done.finished_ms.unwrap();
    let old: Vec<i64> = catalog
        .exports_finished_before(finished_a + 1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(old, vec![a], "only finished exports");
    assert!(
        catalog
            .exports_finished_before(finished_a)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(catalog.delete_export(a).await.unwrap());
    assert!(!catalog.delete_export(a).await.unwrap());
    assert!(catalog.export(a).await.unwrap().is_none());
}

// --- console sessions ------------------------------------------------------------------------

async fn console_sessions_resolve_to_the_users_principal(catalog: Catalog) {
    let web = rules(&["web-*"], &[], &[], &[]);
    catalog.add_group("web", &web).await.unwrap();
    catalog
        .add_user("kim", Role::Operator, &strings(&["web"]))
        .await
        .unwrap();
    let expires = now_ms() + 3_600_000;
    let id = catalog
        .create_session("kim", "secret-1", expires)
        .await
        .unwrap()
        .expect("a known user gets a session");
    assert!(
        catalog
            .create_session("nobody", "secret-2", expires)
            .await
            .unwrap()
            .is_none()
    );

    let (sid, p) = catalog.session("secret-1", 60_000).await.unwrap().unwrap();
    assert_eq!(sid, id);
    assert_eq!(p.token_id, -id, "never a token's id");
    assert_eq!(p.name, "kim");
    assert_eq!(p.role, Role::Operator);
    assert_eq!(p.groups, vec![web]);

    catalog.set_role("kim", Role::Viewer).await.unwrap();
    catalog.revoke_group("kim", "web").await.unwrap();
    let (_, p) = catalog.session("secret-1", 60_000).await.unwrap().unwrap();
    assert_eq!(p.role, Role::Viewer, "the user's current role");
    assert!(p.groups.is_empty());

    catalog.remove_user("kim").await.unwrap();
    assert!(
        catalog.session("secret-1", 60_000).await.unwrap().is_none(),
        "a removed user's sessions end"
    );
}

async fn console_sessions_end_on_sign_out_expiry_and_idleness(catalog: Catalog) {
    catalog.add_user("lee", Role::Viewer, &[]).await.unwrap();
    let later = now_ms() + 3_600_000;
    catalog
        .create_session("lee", "out", later)
        .await
        .unwrap()
        .unwrap();
    catalog
        .create_session("lee", "idle", later)
        .await
        .unwrap()
        .unwrap();
    catalog
        .create_session("lee", "expired", now_ms() - 1)
        .await
        .unwrap()
        .unwrap();

    assert!(catalog.session("out", 60_000).await.unwrap().is_some());
    assert!(catalog.end_session("out").await.unwrap());
    assert!(!catalog.end_session("out").await.unwrap());
    assert!(catalog.session("out", 60_000).await.unwrap().is_none());

    assert!(catalog.session("expired", 60_000).await.unwrap().is_none());
    assert!(
        !catalog.end_session("expired").await.unwrap(),
        "an expired session is removed when it is seen"
    );

    assert!(
        catalog.session("idle", -1).await.unwrap().is_none(),
        "unused for longer than the idle time"
    );
    assert!(
        catalog.session("idle", 60_000).await.unwrap().is_none(),
        "and gone"
    );
    assert!(catalog.session("never", 60_000).await.unwrap().is_none());
}

// --- fleet -----------------------------------------------------------------------------------

async fn a_schedule_tick_has_one_batch(catalog: Catalog) {
    let s = catalog
        .add_schedule(&schedule("nightly", "all"))
        .await
        .unwrap()
        .unwrap();
    let tick = 1_800_000_000_000;
    let first = catalog
        .create_batch(
            &new_batch("all", Some((s.id, "nightly", tick))),
            fleet::state::RUNNING,
            None,
        )
        .await
        .unwrap()
        .expect("the tick's batch");
    assert!(
        catalog
            .create_batch(
                &new_batch("all", Some((s.id, "nightly", tick))),
                fleet::state::SKIPPED,
                Some("again")
            )
            .await
            .unwrap()
            .is_none(),
        "a tick has one batch, on every node"
    );
    let skipped = catalog
        .create_batch(
            &new_batch("all", Some((s.id, "nightly", tick + 60_000))),
            fleet::state::SKIPPED,
            Some("the previous batch still runs"),
        )
        .await
        .unwrap()
        .unwrap();
    let ad_hoc_1 = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap();
    let ad_hoc_2 = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap();
    assert!(
        ad_hoc_1.is_some() && ad_hoc_2.is_some() && ad_hoc_1 != ad_hoc_2,
        "batches without a schedule never collide"
    );

    let b = catalog.batch(first).await.unwrap().unwrap();
    assert_eq!(b.group_name, "all");
    assert_eq!(
        (b.schedule_id, b.schedule_name.as_deref(), b.tick_ms),
        (Some(s.id), Some("nightly"), Some(tick))
    );
    assert_eq!(b.state, "running");
    assert!(!b.is_finished());
    assert_eq!(b.max_concurrency, 4);
    assert_eq!(b.failure_limit.as_deref(), Some("50%"));
    assert!(!b.resolved && !b.cancel_requested);
    assert_eq!(
        (b.stop_state, b.failure_base, b.finished_ms),
        (None, 0, None)
    );
    let sk = catalog.batch(skipped).await.unwrap().unwrap();
    assert_eq!(sk.state, "skipped");
    assert_eq!(sk.reason.as_deref(), Some("the previous batch still runs"));
    assert!(sk.is_finished() && sk.finished_ms.is_some());

    let (last, running) = catalog.schedule_batches(s.id).await.unwrap();
    assert_eq!(last.map(|b| b.id), Some(skipped));
    assert_eq!(running.map(|b| b.id), Some(first));
    let of_schedule: Vec<i64> = catalog
        .batches_of_schedule(s.id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(of_schedule, vec![skipped, first]);
    assert_eq!(catalog.batches_of_schedule(s.id, 1).await.unwrap().len(), 1);
    assert_eq!(
        catalog
            .schedule_batches(s.id + 100)
            .await
            .unwrap()
            .0
            .map(|b| b.id),
        None
    );
    assert!(catalog.batch(first + 100).await.unwrap().is_none());
}

async fn resolving_a_batch_fixes_its_endpoints_once(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    catalog
        .resolve_batch(
            batch,
            &[
                (web.id, "web".to_string()),
                (db.id, "db".to_string()),
                (db.id, "db".to_string()),
                (9_999, "forgotten".to_string()),
            ],
        )
        .await
        .unwrap();
    assert!(catalog.batch(batch).await.unwrap().unwrap().resolved);
    catalog
        .resolve_batch(batch, &[(web.id, "web".to_string())])
        .await
        .unwrap();
    let items = catalog.batch_items(batch).await.unwrap();
    let hosts: Vec<&str> = items.iter().map(|i| i.hostname.as_str()).collect();
    assert_eq!(hosts, ["db", "forgotten", "web"], "by hostname, fixed once");
    assert!(
        items
            .iter()
            .all(|i| i.state == "queued" && i.snapshot_id.is_none())
    );

    let queued = catalog.queued_items(batch).await.unwrap();
    assert_eq!(queued.len(), 3);
    assert_eq!(queued[0].hostname, "db");
    assert!(queued[0].known);
    assert!(queued[0].last_seen_ms.is_some());
    assert_eq!(queued[0].api_url.as_deref(), Some("https://db:7443"));
    assert_eq!(queued[1].hostname, "forgotten");
    assert!(!queued[1].known);
    assert_eq!(
        (queued[1].last_seen_ms, queued[1].api_url.as_deref()),
        (None, None)
    );
    assert_eq!(queued[2].error, None);
}

async fn dispatching_an_item_creates_its_snapshot_once(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    catalog.set_batch_job(batch, "fleet-job").await.unwrap();
    catalog
        .resolve_batch(batch, &[(web.id, "web".into()), (db.id, "db".into())])
        .await
        .unwrap();

    let snap = catalog
        .dispatch_item(batch, web.id, "schedule:nightly")
        .await
        .unwrap()
        .expect("a queued item dispatches");
    assert!(
        catalog
            .dispatch_item(batch, web.id, "schedule:nightly")
            .await
            .unwrap()
            .is_none(),
        "a running item does not dispatch again"
    );
    assert!(
        catalog
            .dispatch_item(batch, 9_999, "x")
            .await
            .unwrap()
            .is_none()
    );
    let s = catalog.snapshot(snap).await.unwrap().unwrap();
    assert_eq!(
        (
            s.state.as_str(),
            s.origin.as_str(),
            s.requested_by.as_str(),
            s.endpoint_id
        ),
        ("queued", "capture", "schedule:nightly", web.id)
    );
    let item = catalog
        .batch_items(batch)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.endpoint_id == web.id)
        .unwrap();
    assert_eq!(
        (item.state.as_str(), item.snapshot_id),
        ("running", Some(snap))
    );

    assert_eq!(
        catalog.items_without_job(batch).await.unwrap(),
        vec![(web.id, "web".to_string(), snap)]
    );
    assert!(catalog.running_item_jobs(batch).await.unwrap().is_empty());
    catalog
        .set_item_job(batch, web.id, "cap-web")
        .await
        .unwrap();
    assert!(catalog.items_without_job(batch).await.unwrap().is_empty());
    assert_eq!(catalog.running_item_jobs(batch).await.unwrap(), ["cap-web"]);
    let mut jobs = catalog.batch_job_ids(batch).await.unwrap();
    jobs.sort();
    assert_eq!(jobs, ["cap-web", "fleet-job"]);

    catalog
        .requeue_item(batch, web.id, "endpoint went offline")
        .await
        .unwrap();
    let back = catalog
        .queued_items(batch)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.endpoint_id == web.id)
        .unwrap();
    assert_eq!(back.error.as_deref(), Some("endpoint went offline"));
    let item = catalog
        .batch_items(batch)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.endpoint_id == web.id)
        .unwrap();
    assert_eq!((item.snapshot_id, item.job_id), (None, None));
    let next = catalog
        .dispatch_item(batch, web.id, "schedule:nightly")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next, snap, "a new capture has a new snapshot row");

    assert_eq!(
        catalog
            .skip_queued_items(batch, "batch expired")
            .await
            .unwrap(),
        1
    );
    let db_item = catalog
        .batch_items(batch)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.endpoint_id == db.id)
        .unwrap();
    assert_eq!(
        (db_item.state.as_str(), db_item.error.as_deref()),
        ("skipped", Some("batch expired"))
    );
    assert_eq!(catalog.skip_queued_items(batch, "again").await.unwrap(), 0);
}

async fn settled_and_orphaned_items_follow_their_snapshots(catalog: Catalog) {
    let mut eps = Vec::new();
    for host in ["a", "b", "c", "d"] {
        eps.push(online(&catalog, host, &[], &[]).await);
    }
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    let list: Vec<(i64, String)> = eps.iter().map(|e| (e.id, e.hostname.clone())).collect();
    catalog.resolve_batch(batch, &list).await.unwrap();
    let mut snaps = Vec::new();
    for e in &eps {
        snaps.push(
            catalog
                .dispatch_item(batch, e.id, "x")
                .await
                .unwrap()
                .unwrap(),
        );
    }
    catalog
        .complete_snapshot(snaps[0], "a-1", 500, "sha-a", &verified(1))
        .await
        .unwrap();
    catalog
        .fail_snapshot(snaps[1], "agent offline")
        .await
        .unwrap();
    catalog
        .set_snapshot_state(snaps[2], SnapshotState::Transferring)
        .await
        .unwrap();
    catalog.delete_snapshot(snaps[3]).await.unwrap();

    let mut settled = catalog.settled_items(batch).await.unwrap();
    settled.sort_by_key(|s| s.endpoint_id);
    assert_eq!(settled.len(), 2);
    assert_eq!(settled[0].endpoint_id, eps[0].id);
    assert_eq!(settled[0].snapshot_state, "complete");
    assert_eq!(
        (settled[0].size, settled[0].error.as_deref()),
        (Some(500), None)
    );
    assert_eq!(settled[0].api_url.as_deref(), Some("https://a:7443"));
    assert!(settled[0].last_seen_ms.is_some());
    assert_eq!(settled[1].snapshot_state, "failed");
    assert_eq!(settled[1].error.as_deref(), Some("agent offline"));
    assert_eq!(settled[1].size, None);

    assert_eq!(
        catalog.orphaned_items(batch).await.unwrap(),
        vec![eps[3].id]
    );

    catalog
        .finish_item(batch, eps[0].id, fleet::item::DONE, None, Some(500))
        .await
        .unwrap();
    assert!(
        catalog
            .settled_items(batch)
            .await
            .unwrap()
            .iter()
            .all(|s| s.endpoint_id != eps[0].id),
        "a finished item is no longer settling"
    );
}

async fn batch_totals_count_items_by_state_with_bytes(catalog: Catalog) {
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        catalog.batch_totals(batch).await.unwrap(),
        fleet::BatchTotals::default()
    );
    let mut eps = Vec::new();
    for host in ["a", "b", "c", "d", "e", "f"] {
        eps.push(online(&catalog, host, &[], &[]).await);
    }
    let list: Vec<(i64, String)> = eps.iter().map(|e| (e.id, e.hostname.clone())).collect();
    catalog.resolve_batch(batch, &list).await.unwrap();
    for e in &eps[..4] {
        catalog
            .dispatch_item(batch, e.id, "x")
            .await
            .unwrap()
            .unwrap();
    }
    catalog
        .finish_item(
            batch,
            eps[0].id,
            fleet::item::DONE,
            None,
            Some(3_000_000_000),
        )
        .await
        .unwrap();
    catalog
        .finish_item(batch, eps[1].id, fleet::item::DONE, None, Some(5))
        .await
        .unwrap();
    catalog
        .finish_item(batch, eps[2].id, fleet::item::FAILED, Some("timeout"), None)
        .await
        .unwrap();
    catalog
        .finish_item(
            batch,
            eps[4].id,
            fleet::item::SKIPPED,
            Some("offline"),
            None,
        )
        .await
        .unwrap();
    catalog
        .finish_item(batch, eps[0].id, fleet::item::FAILED, Some("late"), None)
        .await
        .unwrap();

    assert_eq!(
        catalog.batch_totals(batch).await.unwrap(),
        fleet::BatchTotals {
            total: 6,
            queued: 1,
            running: 1,
            done: 2,
            failed: 1,
            skipped: 1,
            bytes: 3_000_000_005,
        },
        "a finished item is not finished again"
    );
    let failed = catalog
        .batch_items(batch)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.endpoint_id == eps[2].id)
        .unwrap();
    assert_eq!(
        (failed.state.as_str(), failed.error.as_deref(), failed.bytes),
        ("failed", Some("timeout"), None)
    );
}

async fn batch_states_move_only_from_the_states_given(catalog: Catalog) {
    let mut eps = Vec::new();
    for host in ["a", "b", "c"] {
        eps.push(online(&catalog, host, &[], &[]).await);
    }
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    let list: Vec<(i64, String)> = eps.iter().map(|e| (e.id, e.hostname.clone())).collect();
    catalog.resolve_batch(batch, &list).await.unwrap();
    for e in &eps[..2] {
        catalog
            .dispatch_item(batch, e.id, "x")
            .await
            .unwrap()
            .unwrap();
        catalog
            .finish_item(batch, e.id, fleet::item::FAILED, Some("boom"), None)
            .await
            .unwrap();
    }

    assert!(
        !catalog
            .set_batch_state(batch, &[fleet::state::PAUSED], fleet::state::RUNNING, None)
            .await
            .unwrap()
    );
    assert!(
        catalog
            .set_batch_state(
                batch,
                &[fleet::state::RUNNING],
                fleet::state::PAUSED,
                Some("failure limit reached")
            )
            .await
            .unwrap()
    );
    let paused = catalog.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (
            paused.state.as_str(),
            paused.reason.as_deref(),
            paused.finished_ms
        ),
        ("paused", Some("failure limit reached"), None)
    );
    assert!(catalog.resume_batch(batch).await.unwrap());
    assert!(
        !catalog.resume_batch(batch).await.unwrap(),
        "only a paused batch resumes"
    );
    let resumed = catalog.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (
            resumed.state.as_str(),
            resumed.reason.as_deref(),
            resumed.failure_base
        ),
        ("running", None, 2),
        "the failure limit counts from now on"
    );

    catalog
        .set_batch_stop(batch, fleet::state::CANCELLED, "cancelled by alice")
        .await
        .unwrap();
    catalog
        .set_batch_stop(batch, fleet::state::EXPIRED, "expired")
        .await
        .unwrap();
    let stopping = catalog.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (stopping.stop_state.as_deref(), stopping.reason.as_deref()),
        (Some("cancelled"), Some("cancelled by alice")),
        "the first decision stands"
    );

    assert!(catalog.request_batch_cancel(batch).await.unwrap());
    assert!(
        catalog
            .batch(batch)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
    assert!(
        catalog
            .set_batch_state(
                batch,
                &[fleet::state::RUNNING, fleet::state::PAUSED],
                fleet::state::CANCELLED,
                Some("cancelled by alice")
            )
            .await
            .unwrap()
    );
    let ended = catalog.batch(batch).await.unwrap().unwrap();
    assert!(ended.is_finished());
    assert!(ended.finished_ms.is_some());
    assert!(
        !catalog.request_batch_cancel(batch).await.unwrap(),
        "already ended"
    );
    assert!(
        !catalog
            .set_batch_state(
                batch,
                &[fleet::state::RUNNING],
                fleet::state::COMPLETE,
                None
            )
            .await
            .unwrap()
    );
    assert!(!catalog.request_batch_cancel(batch + 100).await.unwrap());
}

async fn batch_listings_and_job_ids(catalog: Catalog) {
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            catalog
                .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    catalog
        .set_batch_state(
            ids[1],
            &[fleet::state::RUNNING],
            fleet::state::COMPLETE,
            None,
        )
        .await
        .unwrap();
    catalog
        .set_batch_state(ids[2], &[fleet::state::RUNNING], fleet::state::PAUSED, None)
        .await
        .unwrap();
    let list = |active: bool, limit: u32| {
        let catalog = catalog.clone();
        async move {
            catalog
                .batches(active, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|b| b.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(false, 10).await, vec![ids[3], ids[2], ids[1], ids[0]]);
    assert_eq!(list(false, 2).await, vec![ids[3], ids[2]]);
    assert_eq!(list(true, 10).await, vec![ids[3], ids[2], ids[0]]);
    assert!(catalog.batch_job_ids(ids[0]).await.unwrap().is_empty());
    catalog.set_batch_job(ids[0], "fleet-0").await.unwrap();
    assert_eq!(catalog.batch_job_ids(ids[0]).await.unwrap(), ["fleet-0"]);
    assert_eq!(
        catalog
            .batch(ids[0])
            .await
            .unwrap()
            .unwrap()
            .job_id
            .as_deref(),
        Some("fleet-0")
    );
}

async fn schedules_are_unique_by_name_and_ticks_only_move_forward(catalog: Catalog) {
    let mut nightly = schedule("nightly", "all");
    nightly.keep_days = Some(30);
    nightly.failure_limit = Some("10".into());
    let before = now_ms();
    let s = catalog.add_schedule(&nightly).await.unwrap().unwrap();
    assert_eq!(s.name, "nightly");
    assert_eq!((s.cron.as_str(), s.tz.as_str()), ("0 2 * * *", "UTC"));
    assert_eq!((s.max_concurrency, s.expire_secs), (8, 3_600));
    assert_eq!(
        (s.keep_last, s.keep_days, s.failure_limit.as_deref()),
        (Some(3), Some(30), Some("10"))
    );
    assert!(!s.paused);
    assert!(s.created_ms >= before);
    assert_eq!(
        s.last_tick_ms,
        Some(s.created_ms),
        "ticks before it was added are not caught up"
    );
    assert!(
        catalog.add_schedule(&nightly).await.unwrap().is_none(),
        "names are unique"
    );
    let mut hourly = schedule("hourly", "web");
    hourly.keep_last = None;
    catalog.add_schedule(&hourly).await.unwrap().unwrap();

    let names: Vec<String> = catalog
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["hourly", "nightly"]);
    assert_eq!(
        catalog.schedule_by_id(s.id).await.unwrap().unwrap().name,
        "nightly"
    );
    assert_eq!(
        catalog.schedule("hourly").await.unwrap().unwrap().keep_last,
        None
    );

    assert!(catalog.set_schedule_paused("nightly", true).await.unwrap());
    assert!(catalog.schedule("nightly").await.unwrap().unwrap().paused);
    assert!(catalog.set_schedule_paused("nightly", false).await.unwrap());
    assert!(!catalog.schedule("nightly").await.unwrap().unwrap().paused);
    assert!(!catalog.set_schedule_paused("missing", true).await.unwrap());

    let t = s.created_ms + 3_600_000;
    catalog.set_schedule_tick(s.id, t).await.unwrap();
    assert_eq!(
        catalog
            .schedule_by_id(s.id)
            .await
            .unwrap()
            .unwrap()
            .last_tick_ms,
        Some(t)
    );
    catalog.set_schedule_tick(s.id, t - 60_000).await.unwrap();
    assert_eq!(
        catalog
            .schedule_by_id(s.id)
            .await
            .unwrap()
            .unwrap()
            .last_tick_ms,
        Some(t),
        "never moves back"
    );

    let batch = catalog
        .create_batch(
            &new_batch("all", Some((s.id, "nightly", t))),
            fleet::state::RUNNING,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(catalog.remove_schedule("nightly").await.unwrap());
    assert!(!catalog.remove_schedule("nightly").await.unwrap());
    assert!(catalog.schedule("nightly").await.unwrap().is_none());
    let orphan = catalog.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (orphan.schedule_id, orphan.schedule_name.as_deref()),
        (None, Some("nightly")),
        "its batches stay, with the schedule's name"
    );
}

async fn kept_snapshots_are_marked_once_and_never_pruned(catalog: Catalog) {
    let ep = online(&catalog, "web", &[], &[]).await;
    let a = complete(&catalog, ep.id, "web-a", 1).await;
    let b = complete(&catalog, ep.id, "web-b", 1).await;
    let c = complete(&catalog, ep.id, "web-c", 1).await;
    let before = now_ms();
    assert!(catalog.keep_snapshot(a, "alice").await.unwrap());
    assert!(
        !catalog.keep_snapshot(a, "bob").await.unwrap(),
        "already kept"
    );
    let (by, when) = catalog.keep_mark(a).await.unwrap().unwrap();
    assert_eq!(by, "alice");
    assert!(when >= before);
    catalog.keep_snapshot(c, "bob").await.unwrap();
    let marks = catalog.keep_marks(&[a, b, c, c + 100]).await.unwrap();
    assert_eq!(marks.len(), 2);
    assert_eq!(marks[&a].0, "alice");
    assert_eq!(marks[&c].0, "bob");
    assert!(catalog.keep_marks(&[]).await.unwrap().is_empty());

    assert_eq!(
        catalog
            .prune_candidates(&strings(&["web"]), Some(0), None)
            .await
            .unwrap(),
        vec![(b, "web".to_string())],
        "kept snapshots are never candidates"
    );

    assert!(catalog.unkeep_snapshot(a).await.unwrap());
    assert!(!catalog.unkeep_snapshot(a).await.unwrap());
    assert!(catalog.keep_mark(a).await.unwrap().is_none());
    assert!(catalog.keep_mark(b).await.unwrap().is_none());
}

async fn prune_candidates_follow_keep_last_and_keep_days_per_endpoint(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let db = online(&catalog, "db", &[], &[]).await;
    let other = online(&catalog, "other", &[], &[]).await;
    let mut w = Vec::new();
    for i in 0..4 {
        w.push(complete(&catalog, web.id, &format!("web-{i}"), 1).await);
    }
    let d0 = complete(&catalog, db.id, "db-0", 1).await;
    let d1 = complete(&catalog, db.id, "db-1", 1).await;
    complete(&catalog, other.id, "other-0", 1).await;
    complete(&catalog, other.id, "other-1", 1).await;
    let unfinished = catalog
        .create_snapshot(web.id, Origin::Capture, "x")
        .await
        .unwrap();
    let failed = catalog
        .create_snapshot(web.id, Origin::Capture, "x")
        .await
        .unwrap();
    catalog.fail_snapshot(failed, "boom").await.unwrap();
    catalog.keep_snapshot(w[0], "alice").await.unwrap();
    let _ = unfinished;

    let hosts = strings(&["web", "db"]);
    assert_eq!(
        catalog
            .prune_candidates(&hosts, Some(2), None)
            .await
            .unwrap(),
        vec![(w[1], "web".to_string())],
        "beyond the newest two per endpoint, kept and unfinished ones neither pruned nor counted"
    );
    assert_eq!(
        catalog
            .prune_candidates(&hosts, Some(1), None)
            .await
            .unwrap(),
        vec![
            (w[1], "web".to_string()),
            (w[2], "web".to_string()),
            (d0, "db".to_string())
        ]
    );
    assert!(
        catalog
            .prune_candidates(&hosts, None, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        catalog
            .prune_candidates(&hosts, Some(10), None)
            .await
            .unwrap()
            .is_empty()
    );

    let d1_ms = catalog.snapshot(d1).await.unwrap().unwrap().created_ms;
    let old: Vec<i64> = catalog
        .prune_candidates(&hosts, None, Some(d1_ms + 1))
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        old,
        vec![w[1], w[2], w[3], d0, d1],
        "created before the cut-off, except the kept one"
    );
    let everything_old: Vec<i64> = catalog
        .prune_candidates(&hosts, Some(10), Some(now_ms() + 60_000))
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(everything_old.len(), 5, "either rule prunes");
    assert!(
        catalog
            .prune_candidates(&[], Some(0), None)
            .await
            .unwrap()
            .is_empty()
    );
}

// --- racing writers --------------------------------------------------------------------------

/// How many tasks race in the tests below: more than either backend's pool has connections, so
/// some wait for one, as requests of several server nodes do.
const RACERS: usize = 12;

/// Runs `RACERS` copies of `task(catalog, i)` at once on the runtime's threads; their results.
async fn race<T, F, Fut>(catalog: &Catalog, task: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Catalog, usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(RACERS));
    let handles: Vec<_> = (0..RACERS)
        .map(|i| {
            let run = task(catalog.clone(), i);
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                run.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(RACERS);
    for h in handles {
        out.push(h.await.expect("racing task panicked"));
    }
    out
}

async fn enrollments_of_one_hostname_at_once_bind_one_agent(catalog: Catalog) {
    let results = race(&catalog, |catalog, i| async move {
        let mut hb = heartbeat("contested", &[], &[]);
        hb.cert_sha256 = format!("cert-{i}");
        catalog
            .enroll(&hb, &format!("nonce-{i}"))
            .await
            .unwrap()
            .map(|_| i)
    })
    .await;
    let winners: Vec<usize> = results.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "exactly one agent is bound: {winners:?}");
    let bound = catalog.endpoint("contested").await.unwrap().unwrap();
    assert_eq!(
        bound.identity_nonce.as_deref(),
        Some(format!("nonce-{}", winners[0]).as_str())
    );
    assert_eq!(
        bound.cert_sha256.as_deref(),
        Some(format!("cert-{}", winners[0]).as_str())
    );
}

async fn an_item_dispatched_many_times_at_once_gets_one_snapshot(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let batch = catalog
        .create_batch(&new_batch("all", None), fleet::state::RUNNING, None)
        .await
        .unwrap()
        .unwrap();
    let endpoints = vec![(web.id, "web".to_string())];
    let resolved = race(&catalog, |catalog, _| {
        let endpoints = endpoints.clone();
        async move { catalog.resolve_batch(batch, &endpoints).await.is_ok() }
    })
    .await;
    assert!(resolved.into_iter().all(|ok| ok));
    assert_eq!(catalog.batch_items(batch).await.unwrap().len(), 1);

    let dispatched = race(&catalog, |catalog, _| async move {
        catalog.dispatch_item(batch, web.id, "x").await.unwrap()
    })
    .await;
    let snapshots: Vec<i64> = dispatched.into_iter().flatten().collect();
    assert_eq!(snapshots.len(), 1, "one capture per endpoint and batch");
    assert_eq!(
        catalog.snapshots(Some("web")).await.unwrap().len(),
        1,
        "and one snapshot row"
    );
    assert_eq!(
        catalog.batch_items(batch).await.unwrap()[0].snapshot_id,
        Some(snapshots[0])
    );
}

async fn racing_writers_of_one_row_see_one_winner(catalog: Catalog) {
    let users = race(&catalog, |catalog, _| async move {
        catalog.add_user("same", Role::Viewer, &[]).await
    })
    .await;
    assert_eq!(users.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        users
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, CatalogError::Conflict(_))),
        "the others are told the name is taken"
    );

    let s = catalog
        .add_schedule(&schedule("nightly", "all"))
        .await
        .unwrap()
        .unwrap();
    let ticks = race(&catalog, |catalog, _| async move {
        catalog
            .create_batch(
                &new_batch("all", Some((s.id, "nightly", 1_900_000_000_000))),
                fleet::state::RUNNING,
                None,
            )
            .await
            .unwrap()
    })
    .await;
    assert_eq!(
        ticks.iter().flatten().count(),
        1,
        "a tick starts one batch across nodes"
    );

    let ep = online(&catalog, "web", &[], &[]).await;
    let snap = complete(&catalog, ep.id, "web-1", 1).await;
    let kept = race(&catalog, |catalog, i| async move {
        catalog
            .keep_snapshot(snap, &format!("user-{i}"))
            .await
            .unwrap()
    })
    .await;
    assert_eq!(kept.iter().filter(|k| **k).count(), 1);
    let deleted = race(&catalog, |catalog, _| async move {
        catalog.delete_snapshot(snap).await.unwrap()
    })
    .await;
    assert_eq!(
        deleted.iter().filter(|d| **d).count(),
        1,
        "exactly one delete reports that it deleted"
    );

    let exported = catalog
        .create_export(&NewExport {
            hostname: None,
            source: serde_json::json!({}),
            format: "csv".into(),
            filters: serde_json::json!([]),
            requested_by: "alice".into(),
        })
        .await
        .unwrap();
    catalog.start_export(exported).await.unwrap();
    let ended = race(&catalog, |catalog, _| async move {
        catalog
            .end_unfinished_export(exported, ExportState::Cancelled, "cancelled")
            .await
            .unwrap()
    })
    .await;
    assert_eq!(ended.iter().filter(|e| **e).count(), 1);
}

async fn two_nodes_migrating_at_once_share_one_catalog(a: Catalog, b: Catalog) {
    let web = online(&a, "web", &["10.0.0.1"], &[]).await;
    assert_eq!(
        b.endpoint("web").await.unwrap().map(|e| e.id),
        Some(web.id),
        "a row one node wrote, the other reads"
    );
    let snap = b
        .create_snapshot(web.id, Origin::Capture, "alice")
        .await
        .unwrap();
    assert!(a.delete_snapshot(snap).await.unwrap());
    assert!(!b.delete_snapshot(snap).await.unwrap());
    assert!(
        b.enroll(&heartbeat("web", &[], &[]), "other")
            .await
            .unwrap()
            .is_none(),
        "an agent bound through one node is bound on every node"
    );
}

// --- more endpoints and sessions --------------------------------------------------------------

async fn forgetting_an_endpoint_without_snapshots_closes_its_connections(catalog: Catalog) {
    let web = online(&catalog, "web", &[], &[]).await;
    let active = ConnectionAttempt {
        status: "active".into(),
        ..Default::default()
    };
    let id = catalog
        .upsert_connection(web.id, "{\"endpoint\":\"web\"}", "alice", &active)
        .await
        .unwrap();
    assert!(catalog.forget_endpoint("web").await.unwrap());
    assert!(
        catalog.connection(id).await.unwrap().is_none(),
        "its connections go with the endpoint"
    );
    assert!(catalog.connections(None).await.unwrap().is_empty());
}

async fn starting_a_session_sweeps_ended_ones(catalog: Catalog) {
    catalog.add_user("max", Role::Viewer, &[]).await.unwrap();
    catalog
        .create_session("max", "ended", now_ms() - 1)
        .await
        .unwrap()
        .unwrap();
    catalog
        .create_session("max", "fresh", now_ms() + 60_000)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !catalog.end_session("ended").await.unwrap(),
        "the ended session was swept when the next one started"
    );
    assert!(catalog.end_session("fresh").await.unwrap());
}

// --- disk reservations -----------------------------------------------------------------------

async fn disk_reservations_count_the_captures_in_flight(catalog: Catalog) {
    let ep = online(&catalog, "web", &[], &[]).await;
    let mut snaps = Vec::new();
    for _ in 0..3 {
        snaps.push(
            catalog
                .create_snapshot(ep.id, Origin::Capture, "alice")
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        catalog.reserve_disk(snaps[0], 600, 1_000).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        catalog.reserve_disk(snaps[1], 500, 1_000).await.unwrap(),
        Err(600),
        "refused with what the captures in flight hold"
    );
    assert_eq!(
        catalog.reserve_disk(snaps[1], 400, 1_000).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        catalog.reserve_disk(snaps[0], 600, 1_000).await.unwrap(),
        Ok(()),
        "a capture's own reservation does not count against it"
    );
    assert_eq!(
        catalog.reserve_disk(snaps[2], 1, 1_000).await.unwrap(),
        Err(1_000)
    );
    catalog
        .set_snapshot_progress(snaps[0], 10, 600)
        .await
        .unwrap();
    catalog.release_disk(snaps[0]).await.unwrap();
    catalog.release_disk(snaps[0]).await.unwrap();
    assert_eq!(
        catalog.reserve_disk(snaps[2], 600, 1_000).await.unwrap(),
        Ok(())
    );
    catalog.release_disk(snaps[1]).await.unwrap();
    catalog.release_disk(snaps[2]).await.unwrap();
    assert_eq!(
        catalog
            .reserve_disk(snaps[0], 5_000_000_000, 5_000_000_000)
            .await
            .unwrap(),
        Ok(()),
        "sizes beyond 32 bits"
    );
    assert_eq!(
        catalog
            .reserve_disk(snaps[1], 1, 5_000_000_000)
            .await
            .unwrap(),
        Err(5_000_000_000)
    );
}

async fn racing_disk_reservations_never_overcommit_the_store(catalog: Catalog) {
    let ep = online(&catalog, "web", &[], &[]).await;
    let mut snaps = Vec::new();
    for _ in 0..RACERS {
        snaps.push(
            catalog
                .create_snapshot(ep.id, Origin::Capture, "alice")
                .await
                .unwrap(),
        );
    }
    let snaps = std::sync::Arc::new(snaps);
    let taken = race(&catalog, |catalog, i| {
        let snaps = snaps.clone();
        async move {
            catalog
                .reserve_disk(snaps[i], 10, 50)
                .await
                .unwrap()
                .is_ok()
        }
    })
    .await;
    assert_eq!(
        taken.iter().filter(|t| **t).count(),
        5,
        "exactly as many captures as the space holds, across nodes"
    );
}

// --- moving a catalog up ---------------------------------------------------------------------

/// A catalog with rows in every table, as a server that ran for a while leaves it.
async fn populate(catalog: &Catalog) {
    let web = online(catalog, "web-01", &["10.0.0.1"], &["prod"]).await;
    let db = online(catalog, "Db-01", &["10.0.0.2", "fd00::2"], &[]).await;
    catalog.ensure_endpoint("uploaded").await.unwrap();
    let done = complete(catalog, web.id, "web-01-a", 5_000_000_000).await;
    complete(catalog, db.id, "db-01-a", 10).await;
    let failed = catalog
        .create_snapshot(db.id, Origin::Capture, "bob")
        .await
        .unwrap();
    catalog
        .fail_snapshot(failed, "agent offline")
        .await
        .unwrap();
    catalog.keep_snapshot(done, "alice").await.unwrap();
    catalog
        .add_group(
            "web",
            &rules(&["web-*"], &["10.0.0.0/8"], &["prod"], &["db-01"]),
        )
        .await
        .unwrap();
    catalog
        .add_user("alice", Role::Admin, &strings(&["web"]))
        .await
        .unwrap();
    catalog
        .set_password_hash("alice", "$argon2id$stub")
        .await
        .unwrap();
    catalog
        .create_token("alice", Some("cli"), "sq_a", "sha-alice", None)
        .await
        .unwrap();
    let revoked = catalog
        .create_token("alice", None, "sq_r", "sha-revoked", Some(now_ms() + 1))
        .await
        .unwrap();
    catalog.revoke_token(revoked.id, "leaked").await.unwrap();
    catalog
        .ensure_bootstrap_token("sha-boot", "sq_boot")
        .await
        .unwrap();
    catalog.authenticate("sha-alice").await.unwrap().unwrap();
    catalog
        .create_session("alice", "session", now_ms() + 3_600_000)
        .await
        .unwrap();
    catalog
        .audit("alice", "user.add", "bob", "ok", Some("detail"))
        .await
        .unwrap();
    catalog
        .audit("system", "capture", "web-01", "queued", None)
        .await
        .unwrap();
    catalog.set_job_target("job-1", "web-01").await.unwrap();
    catalog
        .create_ingest("ingest-1", Origin::Watch, "x.db", "system")
        .await
        .unwrap();
    catalog
        .quarantine_ingest("ingest-1", "bad", Some(std::path::Path::new("/q/x.db")))
        .await
        .unwrap();
    catalog
        .upsert_connection(
            web.id,
            "{\"endpoint\":\"web-01\"}",
            "alice",
            &ConnectionAttempt {
                status: "active".into(),
                db_bytes: Some(7),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    catalog
        .save_evidence(&[evidence("web-01", 1), evidence("db-01", 2)], "alice")
        .await
        .unwrap();
    let export = catalog
        .create_export(&NewExport {
            hostname: Some("web-01".into()),
            source: serde_json::json!({"snapshot": done}),
            format: "csv".into(),
            filters: serde_json::json!([]),
            requested_by: "alice".into(),
        })
        .await
        .unwrap();
    catalog.start_export(export).await.unwrap();
    catalog
        .complete_export(export, 3, 300, "e.csv")
        .await
        .unwrap();
    let s = catalog
        .add_schedule(&schedule("nightly", "web"))
        .await
        .unwrap()
        .unwrap();
    let batch = catalog
        .create_batch(
            &new_batch("web", Some((s.id, "nightly", 1_800_000_000_000))),
            fleet::state::RUNNING,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    catalog
        .resolve_batch(batch, &[(web.id, "web-01".into()), (db.id, "Db-01".into())])
        .await
        .unwrap();
    catalog
        .dispatch_item(batch, web.id, "schedule")
        .await
        .unwrap();
    catalog.set_item_job(batch, web.id, "cap-1").await.unwrap();
}

/// What a user can read from a catalog, as one JSON document to compare.
async fn reads(catalog: &Catalog) -> serde_json::Value {
    let batches = catalog.batches(false, 100).await.unwrap();
    let mut items = Vec::new();
    for b in &batches {
        items.push(catalog.batch_items(b.id).await.unwrap());
    }
    let snapshots = catalog.snapshots(None).await.unwrap();
    let ids: Vec<i64> = snapshots.iter().map(|s| s.id).collect();
    let mut keeps: Vec<(i64, String)> = catalog
        .keep_marks(&ids)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, (by, _))| (id, by))
        .collect();
    keeps.sort();
    let metrics = catalog.metric_counts(0).await.unwrap();
    let mut metric_snapshots = metrics.snapshots.clone();
    metric_snapshots.sort();
    // Before authenticating: that records a use when the last is older than a minute.
    let tokens = catalog.tokens(None).await.unwrap();
    let alice = catalog.authenticate("sha-alice").await.unwrap().unwrap();
    let session = catalog
        .session("session", 3_600_000)
        .await
        .unwrap()
        .unwrap()
        .1;
    serde_json::json!({
        "endpoints": json(&catalog.search_endpoints("").await.unwrap()),
        "snapshots": json(&snapshots),
        "keeps": json(&keeps),
        "users": json(&catalog.users().await.unwrap()),
        "groups": json(&catalog.groups().await.unwrap()),
        "tokens": json(&tokens),
        "audit": json(&catalog.audit_list(&AuditFilter { limit: 1000, ..Default::default() }).await.unwrap()),
        "job_targets": json(&catalog.job_targets(&["job-1"]).await.unwrap()),
        "quarantined": json(&catalog.quarantined(None).await.unwrap()),
        "connections": json(&catalog.connections(None).await.unwrap()),
        "evidence": json(&catalog.evidence_list(None).await.unwrap()),
        "exports": json(&catalog.exports().await.unwrap()),
        "schedules": json(&catalog.schedules().await.unwrap()),
        "batches": json(&batches),
        "items": json(&items),
        "metrics": json(&(metrics.endpoints, metrics.online, metric_snapshots, metrics.connections, metrics.quarantined)),
        "principals": json(&[(alice.name, alice.role, alice.groups), (session.name, session.role, session.groups)]),
    })
}

fn json<T: serde::Serialize>(rows: &T) -> serde_json::Value {
    serde_json::to_value(rows).expect("catalog rows serialize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_catalog_copied_into_postgres_reads_the_same() {
    let Some(db) = snapq_testpg::schema_or_skip("catalog copy_into").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
    populate(&sqlite).await;
    let postgres = Catalog::connect_postgres(&db.url).await.unwrap();

    let copied = sqlite.copy_into(&postgres).await.unwrap();
    let counts: BTreeMap<&str, u64> = copied.into_iter().collect();
    assert_eq!(counts["endpoints"], 3);
    assert_eq!(counts["snapshots"], 4, "one of them a batch item's");
    assert_eq!(counts["tokens"], 3);
    assert_eq!(counts["batch_items"], 2);
    let (from, to) = (reads(&sqlite).await, reads(&postgres).await);
    for (what, rows) in from.as_object().unwrap() {
        assert_eq!(rows, &to[what], "{what} read the same after the copy");
    }

    let before = sqlite.snapshots(None).await.unwrap();
    let web = postgres.endpoint("web-01").await.unwrap().unwrap();
    let next = postgres
        .create_snapshot(web.id, Origin::Capture, "alice")
        .await
        .unwrap();
    assert!(
        before.iter().all(|s| s.id < next),
        "ids continue after the copied ones"
    );
    postgres.add_user("carol", Role::Viewer, &[]).await.unwrap();
    postgres
        .audit("carol", "login", "console", "ok", None)
        .await
        .unwrap();

    assert!(
        matches!(
            sqlite.copy_into(&postgres).await,
            Err(CatalogError::Conflict(_))
        ),
        "only into an empty catalog"
    );
    assert!(matches!(
        postgres.copy_into(&sqlite).await,
        Err(CatalogError::Invalid(_))
    ));
}
