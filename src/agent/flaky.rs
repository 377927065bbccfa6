//! A misbehaving endpoint, for `fleet-sim --flaky`: what a real fleet does to a batch, on demand.
//!
//! [`Flaky::DropDownloads`] cuts the connection in the middle of the first few snapshot
//! downloads (the server must resume with `Range`); [`Flaky::Offline`] goes offline for a while
//! once it has been up for a moment: no heartbeats (the server lists it offline) and every API
//! call answers 503 (a capture in flight retries), then it comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

#[derive(Debug, Clone)]
pub enum Flaky {
    /// Cut this many snapshot downloads after about half of their bytes (1 MiB when the length
    /// is not known yet).
    DropDownloads { times: u32 },
    /// After `after`, be offline for `duration`.
    Offline { after: Duration, duration: Duration },
}

/// A flaky behaviour and its counters, shared by the API layer and the heartbeats.
#[derive(Debug, Clone)]
pub struct FlakyState {
    flaky: Flaky,
    started: Instant,
    cuts_left: Arc<AtomicU32>,
    /// Bytes sent before the cuts (what the server resumes after).
    pub cut_bytes: Arc<AtomicU64>,
}

impl FlakyState {
    pub fn new(flaky: Flaky) -> FlakyState {
        let cuts = match flaky {
            Flaky::DropDownloads { times } => times,
            Flaky::Offline { .. } => 0,
        };
        FlakyState {
            flaky,
            started: Instant::now(),
            cuts_left: Arc::new(AtomicU32::new(cuts)),
            cut_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    fn offline_now(&self) -> bool {
        match self.flaky {
            Flaky::Offline { after, duration } => {
                let up = self.started.elapsed();
                up >= after && up < after + duration
            }
            Flaky::DropDownloads { .. } => false,
        }
    }

    /// Runs the heartbeats, stopping them while offline.
    pub async fn heartbeats<F, Fut>(self, beats: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let Flaky::Offline { after, duration } = self.flaky else {
            return beats().await;
        };
        let _ = tokio::time::timeout(after.saturating_sub(self.started.elapsed()), beats()).await;
        tracing::info!(secs = duration.as_secs(), "flaky endpoint going offline");
        tokio::time::sleep((after + duration).saturating_sub(self.started.elapsed())).await;
        tracing::info!("flaky endpoint back online");
        beats().await
    }

    /// The endpoint API with this behaviour.
    pub fn layer(self, router: Router) -> Router {
        router.layer(middleware::from_fn(move |request, next| {
            let state = self.clone();
            async move { state.handle(request, next).await }
        }))
    }

    async fn handle(&self, request: axum::extract::Request, next: Next) -> Response {
        if self.offline_now() {
            return (StatusCode::SERVICE_UNAVAILABLE, "simulated outage").into_response();
        }
        let download = request.method() == Method::GET
            && request.uri().path().starts_with("/v1/snapshots/")
            && !request.uri().path().ends_with("/info");
        let response = next.run(request).await;
        if !download || !response.status().is_success() {
            return response;
        }
        let length = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A copy still being written is served without a length: cut after 1 MiB then.
        let cut_at = match length {
            Some(l) if l <= 64 << 10 => return response,
            Some(l) => l / 2,
            None => 1 << 20,
        };
        if self
            .cuts_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_err()
        {
            return response;
        }
        self.cut_bytes.fetch_add(cut_at, Ordering::Relaxed);
        let (parts, body) = response.into_parts();
        let mut sent = 0u64;
        let stream = body.into_data_stream().map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            if sent >= cut_at {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "simulated connection drop",
                ));
            }
            let keep = chunk.len().min((cut_at - sent) as usize);
            sent += keep as u64;
            Ok(chunk.slice(..keep))
        });
        Response::from_parts(parts, Body::from_stream(stream))
    }
}
