//! Prometheus metrics: `GET /metrics` on the API (admins, with their token) and, when
//! `--metrics-listen` is set, on a plain-HTTP listener of its own (no token: bind it to loopback
//! or a monitoring network). HTTP requests are counted here, by route template (never by an
//! endpoint name or id); the queue's and handlers' own counters live in `snapq_jobs::metrics`;
//! everything that is a level (jobs by state, endpoints online, disk, connections) is read at
//! scrape time from the queue and the catalog, so a scrape always agrees with `queue status`.

use std::sync::{Arc, LazyLock, atomic::AtomicU64};
use std::time::Instant;

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::{Registry, Unit};
use snapq_core::access::Role;
use snapq_jobs::metrics::{Histograms, Labels};

use super::{ServerState, access::Access};
use crate::http::ApiError;

/// Seconds an HTTP request took until its response headers.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn http_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(HTTP_BUCKETS.iter().copied())
}

struct HttpMetrics {
    requests: Family<Labels, Counter>,
    seconds: Histograms,
}

fn http() -> &'static HttpMetrics {
    static HTTP: LazyLock<HttpMetrics> = LazyLock::new(|| HttpMetrics {
        requests: Family::default(),
        seconds: Family::new_with_constructor(http_histogram),
    });
    &HTTP
}

/// Counts a request under its route template (`/v1/snapshots/{id}`); a route layer, so only
/// requests that matched a route are counted.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let m = http();
    let labels: Labels = vec![("method", method), ("route", route)];
    m.seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    let mut labels = labels;
    labels.push(("status", response.status().as_u16().to_string()));
    m.requests.get_or_create(&labels).inc();
    response
}

/// `GET /metrics` on the API: admins only (a scrape reveals the whole fleet's numbers).
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (
            status = 200,
            description = "the server's Prometheus metrics",
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body = String,
        ),
    ),
)]
pub async fn scrape(access: Access, State(state): State<Arc<ServerState>>) -> Response {
    if let Err(e) = access.require(Role::Admin) {
        return e.into_response();
    }
    exposition(&state).await
}

/// The router of the `--metrics-listen` listener: `/metrics` and nothing else.
pub fn listener_router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<Arc<ServerState>>| async move { exposition(&state).await }),
        )
        .with_state(state)
}

async fn exposition(state: &ServerState) -> Response {
    match render(state).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::http::OPENMETRICS)], text).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every metric as OpenMetrics text.
pub async fn render(state: &ServerState) -> Result<String, ApiError> {
    let mut registry = Registry::default();
    snapq_jobs::metrics::metrics().register(&mut registry);
    let h = http();
    registry.register(
        "snapq_http_requests",
        "HTTP requests answered, by method, route template and status",
        h.requests.clone(),
    );
    registry.register_with_unit(
        "snapq_http_request_duration",
        "Time to the response headers, by method and route template",
        Unit::Seconds,
        h.seconds.clone(),
    );

    // The queue, as `queue status` shows it.
    let status = super::api::served_queue_status(state).await?;
    let jobs: Family<Labels, Gauge> = Family::default();
    let oldest: Family<Labels, Gauge> = Family::default();
    for k in &status.kinds {
        for (s, n) in [
            ("pending", k.pending),
            ("running", k.running),
            ("retrying", k.retrying),
            ("done", k.done),
            ("failed", k.failed),
            ("cancelled", k.cancelled),
        ] {
            jobs.get_or_create(&vec![("kind", k.kind.clone()), ("state", s.to_owned())])
                .set(n as i64);
        }
        oldest
            .get_or_create(&vec![("kind", k.kind.clone())])
            .set(k.oldest_pending_age_ms.map_or(0, |ms| (ms / 1000) as i64));
    }
    registry.register(
        "snapq_jobs",
        "Jobs in the queue, by kind and state (finished ones until retention prunes them)",
        jobs,
    );
    registry.register_with_unit(
        "snapq_job_oldest_pending_age",
        "Age of the oldest runnable pending job, by kind (0: none waiting)",
        Unit::Seconds,
        oldest,
    );
    let busy: Family<Labels, Gauge> = Family::default();
    let slots: Family<Labels, Gauge> = Family::default();
    for w in &status.local_workers {
        let labels = vec![("kind", w.kind.as_str().to_owned())];
        busy.get_or_create(&labels).set(w.running as i64);
        slots.get_or_create(&labels).set(w.concurrency as i64);
    }
    registry.register(
        "snapq_worker_busy",
        "This node's workers running a job, by kind",
        busy,
    );
    registry.register(
        "snapq_worker_slots",
        "This node's worker concurrency, by kind",
        slots,
    );
    let workers = state.queue.workers().await.map_err(ApiError::internal)?;
    let oldest_heartbeat = workers
        .iter()
        .map(|w| w.heartbeat_age_ms)
        .max()
        .unwrap_or(0);
    registry.register(
        "snapq_queue_workers",
        "Workers of every node on this queue not marked stopped",
        gauge_of(workers.len() as i64),
    );
    let heartbeat_age: Gauge<f64, AtomicU64> = Gauge::default();
    heartbeat_age.set(oldest_heartbeat as f64 / 1000.0);
    registry.register_with_unit(
        "snapq_worker_heartbeat_oldest_age",
        "Age of the oldest heartbeat among workers not marked stopped (a dead node's grows)",
        Unit::Seconds,
        heartbeat_age,
    );

    // The catalog.
    let now = snapq_core::catalog::now_ms();
    let online_since = now - state.config.online_window.as_millis() as i64;
    let counts = state
        .catalog
        .metric_counts(online_since)
        .await
        .map_err(ApiError::internal)?;
    registry.register(
        "snapq_endpoints",
        "Endpoints known to the server",
        gauge_of(counts.endpoints),
    );
    registry.register(
        "snapq_endpoints_online",
        "Endpoints that sent a heartbeat within the online window",
        gauge_of(counts.online),
    );
    let snapshots: Family<Labels, Gauge> = Family::default();
    let mut store_bytes = 0;
    for (s, n, bytes) in &counts.snapshots {
        snapshots.get_or_create(&vec![("state", s.clone())]).set(*n);
        if s == "complete" {
            store_bytes = *bytes;
        }
    }
    registry.register("snapq_snapshots", "Snapshots, by state", snapshots);
    registry.register_with_unit(
        "snapq_store",
        "Bytes of complete snapshots in the store",
        Unit::Bytes,
        gauge_of(store_bytes),
    );
    let connections: Family<Labels, Gauge> = Family::default();
    for (s, n) in &counts.connections {
        connections
            .get_or_create(&vec![("status", s.clone())])
            .set(*n);
    }
    registry.register(
        "snapq_live_connections",
        "Live connections, by status",
        connections,
    );
    registry.register(
        "snapq_quarantined_files",
        "Files in quarantine",
        gauge_of(counts.quarantined),
    );

    // The disk of the snapshot store.
    let store_dir = state.config.store_dir.clone();
    let free = tokio::task::spawn_blocking(move || snapq_core::disk::free_bytes(&store_dir))
        .await
        .map_err(ApiError::internal)?
        .unwrap_or(0);
    registry.register_with_unit(
        "snapq_store_disk_free",
        "Free bytes on the snapshot store's file system",
        Unit::Bytes,
        gauge_of(free as i64),
    );
    registry.register_with_unit(
        "snapq_capture_reserved",
        "Bytes held for captures in flight on this node",
        Unit::Bytes,
        gauge_of(state.services.reservations.held() as i64),
    );
    registry.register_with_unit(
        "snapq_capture_reserve",
        "Bytes captures always leave free (the capture reserve)",
        Unit::Bytes,
        gauge_of(state.config.capture_reserve_bytes as i64),
    );

    let mut text = String::new();
    encode(&mut text, &registry).map_err(ApiError::internal)?;
    Ok(text)
}

fn gauge_of(value: i64) -> Gauge {
    let g: Gauge = Gauge::default();
    g.set(value);
    g
}
