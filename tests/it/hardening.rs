//! The server under hostile or careless clients: silent connections, malformed JSON, oversized
//! uploads, a full disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{AgentOptions, TestAgent, TestServer, files_under};

/// Sends `head` (request line and headers, no body) over TLS and returns what the server answers
/// within 10 s.
async fn raw_request(server: &TestServer, head: &str) -> String {
    let pin = snapq::tls::cert_pin(&server.data_dir.join("certs/httpPublicCert.pem")).unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(snapq_core::pin::client_config(&pin, "test")));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut answer))
        .await
        .expect("the server answered in time")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_silent_connections_do_not_stop_the_server_answering_others() {
    let server = TestServer::spawn();
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let started = Instant::now();
    let (status, body) = server.get("/v1/endpoints").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered only after {:?}",
        started.elapsed()
    );
    // A connection that never starts its handshake is closed once the handshake time is up.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        snapq::tls::HANDSHAKE_TIMEOUT + Duration::from_secs(10),
        silent[0].read(&mut buf),
    )
    .await
    .expect("the server closed the silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// A client that finishes its TLS handshake and then sends its headers too slowly (a slowloris)
/// is cut off once the header time is up, while others are answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off_at_the_header_timeout() {
    let server = TestServer::spawn();
    let pin = snapq::tls::cert_pin(&server.data_dir.join("certs/httpPublicCert.pem")).unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(snapq_core::pin::client_config(&pin, "test")));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    // A request line and one header, and never the blank line that ends the headers.
    tls.write_all(b"GET /v1/endpoints HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (status, _) = server.get("/status").await;
    assert_eq!(status, 200, "others are answered meanwhile");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        snapq::tls::HEADER_READ_TIMEOUT + Duration::from_secs(15),
        tls.read_to_end(&mut answer),
    )
    .await
    .expect("the server cut the slow client off");
    let took = started.elapsed();
    assert!(
        took + Duration::from_secs(1) >= snapq::tls::HEADER_READ_TIMEOUT,
        "cut off after {took:?}, before the header timeout"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_err() || !answer.contains(" 200 "),
        "a request whose headers never ended was served: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_gets_a_json_error_naming_the_problem() {
    let server = TestServer::spawn();
    let response = server
        .client()
        .post(format!("{}/v1/captures", server.url()))
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body("{\"hosts\": [\"web-01\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("JSON"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_declaring_more_than_the_limit_is_refused_before_its_body() {
    let server = TestServer::spawn_with(&["--upload-max-mib", "1"]);
    let answer = raw_request(
        &server,
        &format!(
            "POST /v1/uploads?name=big_2026_01_01T00.00.00.000Z.db HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            server.token,
            10u64 << 30
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("larger than the upload limit of 1.0 MiB"),
        "{answer}"
    );
    assert!(files_under(&server.data_dir.join("incoming")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_would_eat_into_the_disk_reserve_is_refused_before_spooling() {
    let free_mib = snapq_core::disk::free_bytes(&std::env::temp_dir()).unwrap() >> 20;
    let reserve = (free_mib + 1024).to_string();
    let server = TestServer::spawn_with(&["--capture-reserve-mib", &reserve]);
    let response = server
        .client()
        .post(format!(
            "{}/v1/uploads?name=web-01_2026_01_01T00.00.00.000Z.db",
            server.url()
        ))
        .bearer_auth(&server.token)
        .body(vec![0u8; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 507);
    let body: serde_json::Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("insufficient disk space"), "{error}");
    assert!(error.contains("reserve"), "{error}");
    assert!(files_under(&server.data_dir.join("incoming")).is_empty());
    let (_, jobs) = server.get("/v1/queue/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_keeps_its_staging_reserve_free() {
    let free_mib = snapq_core::disk::free_bytes(&std::env::temp_dir()).unwrap() >> 20;
    let agent = TestAgent::spawn_with(AgentOptions {
        prefill: 1_000,
        // More than is free, with room for other tests freeing disk meanwhile.
        extra: vec![
            "--staging-reserve-mib".into(),
            (free_mib + 1024).to_string(),
        ],
        ..AgentOptions::default()
    });
    let (status, body) = agent.post("/v1/snapshots").await;
    assert_eq!(status, 507, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("the staging reserve"), "{error}");
    let (_, staged) = agent.get("/v1/snapshots").await;
    assert_eq!(staged.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_answering_with_an_endless_body_is_cut_off() {
    use axum::routing::get;
    let server = TestServer::spawn_with(&["--job-max-attempts", "1"]);
    let app = axum::Router::new().route(
        "/v1/endpoint/size",
        get(|| async { format!("{{\"db_bytes\": 1, \"pad\": \"{}\"}}", "x".repeat(8 << 20)) }),
    );
    let certs = tempfile::tempdir().unwrap();
    let pair = snapq::tls::CertPair::ensure(certs.path(), &["localhost".into()]).unwrap();
    let (config, pin) = (pair.server_config().unwrap(), pair.pin().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _agent = tokio::spawn(snapq::tls::serve(
        listener,
        config,
        app,
        std::future::pending(),
    ));
    let (status, _) = crate::server::heartbeat(
        &server,
        &server.enroll_secret(),
        "chatty",
        &format!("https://{addr}"),
        &pin,
    )
    .await;
    assert_eq!(status, 200);
    let (snap, _) =
        crate::server::capture_fails(&server, "chatty", "larger than 1048576 bytes").await;
    assert_eq!(snap["bytes_done"], 0, "{snap}");
}
