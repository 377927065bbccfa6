//! HTTP pieces the agent API and the server API share: JSON errors, bearer tokens, ranged files.

use std::io::SeekFrom;
use std::path::Path;

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The content type of an OpenMetrics exposition (`/metrics` of the server and of the agent).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An error answer: a status and a message a person can act on, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %err, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        Self::internal(format!("{err:#}"))
    }
}

/// A layer for every router: an error answer that is not JSON already (axum's rejections of
/// malformed JSON, a bad query string or path, a body over its limit) becomes `{"error": "..."}`
/// with the same status, so clients always find the reason in the same place.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The token of `Authorization: Bearer <token>`, if the request carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the request carries `Authorization: Bearer <expected>`, compared in constant time.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    bearer(headers).is_some_and(|given| same_secret(given, expected))
}

/// Whether two secrets are equal, compared in constant time.
pub fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token: send `Authorization: Bearer <token>`",
    )
}

/// Serves a whole file or the single byte range asked for (`Range: bytes=A-B`, `A-`, `-N`), with an
/// `ETag` so a resuming client can tell whether it still gets the same bytes.
pub async fn serve_file(
    path: &Path,
    etag: &str,
    request: &HeaderMap,
    growing: Option<Growing>,
) -> Result<Response, ApiError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::not_found(format!("file is gone: {e}")))?;
    let size = match &growing {
        Some(g) => g.size,
        None => file.metadata().await.map_err(ApiError::internal)?.len(),
    };
    let etag_value = HeaderValue::from_str(&format!("\"{etag}\"")).map_err(ApiError::internal)?;
    let range = match request.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(spec) => match parse_range(spec, size) {
            Some(r) => Some(r),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [
                        (header::CONTENT_RANGE, format!("bytes */{size}")),
                        (header::ETAG, format!("\"{etag}\"")),
                    ],
                    Json(serde_json::json!({
                        "error": format!("range {spec:?} is outside the file's {size} bytes")
                    })),
                )
                    .into_response());
            }
        },
    };
    let (status, start, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, size),
    };
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let body = match growing {
        None => Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file.take(len),
            CHUNK,
        )),
        Some(g) => Body::from_stream(follow(file, start, start + len, g.written)),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag_value);
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
                .map_err(ApiError::internal)?,
        );
    }
    Ok(response)
}

const CHUNK: usize = 256 * 1024;

/// A file still being written: its final size, and the bytes written so far (the writer drops the
/// sender when it stops, finished or not).
pub struct Growing {
    pub size: u64,
    pub written: tokio::sync::watch::Receiver<u64>,
}

/// The bytes `[pos, end)` of a file being written, each chunk sent once it is on disk; fails if the
/// writer stops before `end`.
fn follow(
    file: tokio::fs::File,
    pos: u64,
    end: u64,
    written: tokio::sync::watch::Receiver<u64>,
) -> impl futures::Stream<Item = std::io::Result<axum::body::Bytes>> {
    futures::stream::try_unfold(
        (file, pos, written),
        move |(mut file, pos, mut written)| async move {
            if pos >= end {
                return Ok(None);
            }
            let want = (end - pos).min(CHUNK as u64);
            let ready = written.wait_for(|&n| n >= pos + want).await.is_ok();
            // A range may start beyond what has been written so far: nothing is available yet.
            let available = (*written.borrow()).min(end).saturating_sub(pos);
            if !ready && available == 0 {
                return Err(std::io::Error::other(
                    "the file stopped growing before it was complete",
                ));
            }
            let mut buf = vec![0u8; want.min(available.max(1)) as usize];
            file.read_exact(&mut buf).await?;
            let n = buf.len() as u64;
            Ok(Some((
                axum::body::Bytes::from(buf),
                (file, pos + n, written),
            )))
        },
    )
}

/// Parses one `bytes=` range against a file of `size` bytes into inclusive `(start, end)`.
/// `None` means unsatisfiable (416); several ranges are not supported and count as unsatisfiable.
fn parse_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::{HeaderMap, header};
    use tokio::sync::watch;

    use super::{Growing, parse_range, serve_file};

    fn append(path: &std::path::Path, bytes: &[u8]) {
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn a_growing_file_is_served_whole_as_it_is_written_also_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        let content: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content[..100_000]).unwrap();
        let (tx, written) = watch::channel(100_000u64);
        let growing = || {
            Some(Growing {
                size: content.len() as u64,
                written: written.clone(),
            })
        };
        let whole = serve_file(&path, "id", &HeaderMap::new(), growing())
            .await
            .unwrap();
        assert_eq!(whole.headers()[header::CONTENT_LENGTH], "700000");
        let mut ranged = HeaderMap::new();
        ranged.insert(header::RANGE, "bytes=650000-".parse().unwrap());
        let tail = serve_file(&path, "id", &ranged, growing()).await.unwrap();
        assert_eq!(tail.status(), 206);
        let whole = tokio::spawn(axum::body::to_bytes(whole.into_body(), usize::MAX));
        let tail = tokio::spawn(axum::body::to_bytes(tail.into_body(), usize::MAX));

        append(&path, &content[100_000..400_000]);
        tx.send_replace(400_000);
        append(&path, &content[400_000..]);
        tx.send_replace(700_000);
        drop(tx);
        assert!(whole.await.unwrap().unwrap() == content[..]);
        assert!(tail.await.unwrap().unwrap() == content[650_000..]);
    }

    #[tokio::test]
    async fn a_growing_file_whose_writer_stops_early_ends_in_an_error_not_a_short_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        std::fs::write(&path, vec![1u8; 300_000]).unwrap();
        let (tx, written) = watch::channel(300_000u64);
        let response = serve_file(
            &path,
            "id",
            &HeaderMap::new(),
            Some(Growing {
                size: 1_000_000,
                written,
            }),
        )
        .await
        .unwrap();
        drop(tx);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        assert!(body.is_err(), "a short body was served as complete");
    }

    #[tokio::test]
    async fn a_range_past_what_was_written_when_the_writer_stops_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        std::fs::write(&path, vec![1u8; 300_000]).unwrap();
        let (tx, written) = watch::channel(300_000u64);
        let mut ranged = HeaderMap::new();
        ranged.insert(header::RANGE, "bytes=500000-".parse().unwrap());
        let response = serve_file(
            &path,
            "id",
            &ranged,
            Some(Growing {
                size: 1_000_000,
                written,
            }),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 206);
        drop(tx);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        assert!(body.is_err(), "a range never written was served");
    }

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
    }
}
