//! The OpenAPI document: served without a token, and the same as the committed
//! `docs/openapi.json` (which `SNAPQ_UPDATE_OPENAPI=1` rewrites).

use crate::support::TestServer;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one() {
    let server = TestServer::spawn();
    let response = server
        .client()
        .get(format!("{}/v1/openapi.json", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served = response.text().await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    if std::env::var_os("SNAPQ_UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &served).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        served == committed,
        "docs/openapi.json differs from the document the server serves; regenerate it with \
         `SNAPQ_UPDATE_OPENAPI=1 cargo test --test it -- openapi` and commit it"
    );
}

// What schemathesis found, each a regression test.

/// Removing a user read the catalog, then wrote it, in a deferred transaction: another
/// connection's write in between made it fail at once with "database is locked" (a 500).
#[tokio::test(flavor = "multi_thread")]
async fn users_removed_while_others_are_added_never_answer_500() {
    let server = TestServer::spawn();
    let client = server.client();
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let request = client
            .request(method, format!("{}{path}", server.url()))
            .bearer_auth(&server.token);
        let request = match body {
            Some(b) => request.json(&b),
            None => request,
        };
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    for i in 0..40 {
        let body = serde_json::json!({ "name": format!("old-{i}"), "role": "viewer" });
        let (status, text) = call(reqwest::Method::POST, "/v1/users".into(), Some(body)).await;
        assert_eq!(status, 201, "{text}");
    }
    let removals =
        (0..40).map(|i| call(reqwest::Method::DELETE, format!("/v1/users/old-{i}"), None));
    let additions = (0..40).map(|i| {
        let body = serde_json::json!({ "name": format!("new-{i}"), "role": "viewer" });
        call(reqwest::Method::POST, "/v1/users".into(), Some(body))
    });
    let (removed, added) = futures::future::join(
        futures::future::join_all(removals),
        futures::future::join_all(additions),
    )
    .await;
    for (status, text) in removed {
        assert_eq!(status, 200, "{text}");
    }
    for (status, text) in added {
        assert_eq!(status, 201, "{text}");
    }
}
