//! The web console's server side over plain HTTPS (no browser needed): signing in and out, the
//! session cookie's flags, CSRF protection, the delay after failed sign-ins, the security headers
//! and the embedded pages. The browser tests are in `console_browser.rs`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::TestServer;

pub const PASSWORD: &str = "correct horse battery";

/// Makes user `name` with `role`, granted `groups`, with the console password [`PASSWORD`].
pub async fn console_user(server: &TestServer, name: &str, role: &str, groups: &[&str]) {
    let client = server.client();
    let made = client
        .post(format!("{}/v1/users", server.url()))
        .bearer_auth(&server.token)
        .json(&json!({ "name": name, "role": role, "groups": groups }))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201, "{:?}", made.text().await);
    let set = client
        .post(format!("{}/v1/users/{name}/password", server.url()))
        .bearer_auth(&server.token)
        .json(&json!({ "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
}

/// A signed-in console session: the cookie header to send and the CSRF token.
struct Session {
    cookie: String,
    csrf: String,
    set_cookie: String,
}

async fn sign_in(server: &TestServer, user: &str, password: &str) -> Result<Session, (u16, Value)> {
    let response = server
        .client()
        .post(format!("{}/v1/session", server.url()))
        .json(&json!({ "username": user, "password": password }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != 201 {
        return Err((status, body));
    }
    let set_cookie = set_cookie.expect("a sign-in sets the session cookie");
    Ok(Session {
        cookie: set_cookie.split(';').next().unwrap().to_owned(),
        csrf: body["csrf_token"].as_str().unwrap().to_owned(),
        set_cookie,
    })
}

/// A request with the session cookie (and `csrf` in X-CSRF-Token when given).
async fn with_cookie(
    server: &TestServer,
    cookie: &str,
    csrf: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.request(method, path).header("cookie", cookie);
    if let Some(token) = csrf {
        request = request.header("x-csrf-token", token);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn audit(server: &TestServer, action: &str) -> Vec<Value> {
    let (status, entries) = server.get(&format!("/v1/audit?action={action}")).await;
    assert_eq!(status, 200, "{entries}");
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_in_gives_a_secure_httponly_strict_cookie_that_stands_for_the_user() {
    if !crate::support::catalog_in_data_dir(
        "signing_in_gives_a_secure_httponly_strict_cookie_that_stands_for_the_user",
    ) {
        return;
    }
    let server = TestServer::spawn();
    console_user(&server, "ana", "viewer", &[]).await;
    let session = sign_in(&server, "ana", PASSWORD).await.unwrap();
    let flags = session.set_cookie.to_ascii_lowercase();
    for flag in ["httponly", "secure", "samesite=strict", "path=/"] {
        assert!(
            flags.contains(flag),
            "{flag} missing: {}",
            session.set_cookie
        );
    }
    assert!(
        session.set_cookie.starts_with("__Host-snapq_session="),
        "{}",
        session.set_cookie
    );
    let (status, me) =
        with_cookie(&server, &session.cookie, None, "GET", "/v1/session", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"], "ana");
    assert_eq!(me["role"], "viewer");
    assert_eq!(me["csrf_token"], session.csrf.as_str());
    // The same scope and role checks as a token: a viewer lists, but may not capture.
    let (status, _) =
        with_cookie(&server, &session.cookie, None, "GET", "/v1/endpoints", None).await;
    assert_eq!(status, 200);
    let (status, body) = with_cookie(
        &server,
        &session.cookie,
        Some(&session.csrf),
        "POST",
        "/v1/users",
        Some(json!({ "name": "mallory", "role": "admin" })),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Only the secret's hash is stored.
    let secret = session.cookie.split_once('=').unwrap().1;
    let catalog = std::fs::read(server.data_dir.join("catalog.db")).unwrap();
    let wal = std::fs::read(server.data_dir.join("catalog.db-wal")).unwrap_or_default();
    for bytes in [&catalog, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the session secret is stored in the clear"
        );
    }
    let signins = audit(&server, "console.signin").await;
    assert!(
        signins
            .iter()
            .any(|e| e["result"] == "ok" && e["actor"] == "ana")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_with_the_session_cookie_needs_the_sessions_csrf_token() {
    let server = TestServer::spawn();
    console_user(&server, "op", "operator", &[]).await;
    let session = sign_in(&server, "op", PASSWORD).await.unwrap();
    let other = sign_in(&server, "op", PASSWORD).await.unwrap();
    assert_ne!(session.csrf, other.csrf, "each session has its own token");
    let body = json!({ "label": "from the console" });
    for (csrf, what) in [
        (None, "missing"),
        (Some("0".repeat(64)), "wrong"),
        (Some(other.csrf.clone()), "another session's"),
    ] {
        let (status, answer) = with_cookie(
            &server,
            &session.cookie,
            csrf.as_deref(),
            "POST",
            "/v1/tokens",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 403, "{what} CSRF token: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("CSRF"),
            "{answer}"
        );
    }
    let (_, tokens) = server.get("/v1/tokens?user=op").await;
    assert_eq!(tokens, json!([]), "no forged request made a token");
    let (status, made) = with_cookie(
        &server,
        &session.cookie,
        Some(&session.csrf),
        "POST",
        "/v1/tokens",
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let refused = audit(&server, "console.csrf").await;
    assert_eq!(refused.len(), 3, "{refused:?}");
    // A bearer token needs no CSRF token (a browser never sends one by itself).
    let (status, _) = crate::support::TestServer::get(&server, "/v1/whoami").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cookie_of_a_signed_out_session_is_refused() {
    let server = TestServer::spawn();
    console_user(&server, "ana", "viewer", &[]).await;
    let session = sign_in(&server, "ana", PASSWORD).await.unwrap();
    // Signing out is a change: without the token it is refused, and the session lives on.
    let (status, _) = with_cookie(
        &server,
        &session.cookie,
        None,
        "DELETE",
        "/v1/session",
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, out) = with_cookie(
        &server,
        &session.cookie,
        Some(&session.csrf),
        "DELETE",
        "/v1/session",
        None,
    )
    .await;
    assert_eq!((status, &out["signed_out"]), (200, &json!(true)), "{out}");
    for path in ["/v1/session", "/v1/endpoints", "/v1/snapshots"] {
        let (status, body) = with_cookie(&server, &session.cookie, None, "GET", path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("sign in again"),
            "{body}"
        );
    }
    assert_eq!(audit(&server, "console.signout").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_wrong_passwords_are_slowed_down_and_audited() {
    let server = TestServer::spawn();
    console_user(&server, "ana", "operator", &[]).await;
    let mut took = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let (status, body) = sign_in(&server, "ana", "not the password")
            .await
            .err()
            .expect("a wrong password is refused");
        took.push(started.elapsed());
        assert_eq!(status, 401, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("wrong username or password"),
            "{body}"
        );
    }
    // The first few cost only the password check; every later one waits its turn.
    let slow = Duration::from_millis(900);
    assert!(took[..3].iter().all(|t| *t < slow), "{took:?}");
    assert!(took[3..].iter().all(|t| *t >= slow), "{took:?}");
    let refused: Vec<Value> = audit(&server, "console.signin")
        .await
        .into_iter()
        .filter(|e| e["result"] == "refused" && e["target"] == "ana")
        .collect();
    assert_eq!(refused.len(), 10, "{refused:?}");
    assert!(
        refused
            .iter()
            .any(|e| e["detail"].as_str().unwrap_or("").contains("delayed")),
        "{refused:?}"
    );
    // An unknown user is refused the same way, and the right password still works (slowly).
    let (status, _) = sign_in(&server, "nobody", PASSWORD).await.err().unwrap();
    assert_eq!(status, 401);
    let started = Instant::now();
    sign_in(&server, "ana", PASSWORD).await.unwrap();
    assert!(started.elapsed() >= slow);
    // A success clears the slate.
    let started = Instant::now();
    sign_in(&server, "ana", PASSWORD).await.unwrap();
    assert!(started.elapsed() < slow);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_posted_from_another_origin_is_refused() {
    let server = TestServer::spawn();
    console_user(&server, "ana", "viewer", &[]).await;
    let response = server
        .client()
        .post(format!("{}/v1/session", server.url()))
        .header("origin", "https://evil.example")
        .json(&json!({ "username": "ana", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.headers().get("set-cookie").is_none());
    // A form post (not JSON) cannot sign in either.
    let response = server
        .client()
        .post(format!("{}/v1/session", server.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username=ana&password={PASSWORD}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_from_the_binary_with_security_headers() {
    let server = TestServer::spawn();
    let client = server.client();
    let index = client.get(server.url()).send().await.unwrap();
    assert_eq!(index.status(), 200);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(header(&index, "content-type").starts_with("text/html"));
    let csp = header(&index, "content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(header(&index, "x-content-type-options"), "nosniff");
    let html = index.text().await.unwrap();
    // No inline script: every script tag loads a file of the console.
    for tag in html.split("<script").skip(1) {
        let tag = &tag[..tag.find('>').unwrap()];
        assert!(
            tag.contains("src=\"/console/"),
            "inline script: <script{tag}>"
        );
    }
    for (file, kind) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let r = client
            .get(format!("{}/console/{file}", server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{file}");
        assert!(header(&r, "content-type").starts_with(kind), "{file}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        let text = r.text().await.unwrap();
        // Values are rendered as text: the script never hands markup to the page, and
        // loads nothing from elsewhere.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "http://",
            "https://",
            "eval(",
        ] {
            assert!(!text.contains(sink), "{file} uses {sink}");
        }
    }
    let missing = client
        .get(format!("{}/console/../catalog.db", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The API's answers carry the headers too.
    let status = client
        .get(format!("{}/status", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&status, "x-content-type-options"), "nosniff");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_pages_actions_are_refused_to_viewers_operators_and_posts_without_csrf() {
    let server = TestServer::spawn();
    for (name, glob) in [("team", "demo-*"), ("web", "web-*")] {
        crate::access::admin(
            &server,
            "POST",
            "/v1/groups",
            Some(json!({ "name": name, "hostnames": [glob] })),
        )
        .await;
    }
    crate::access::admin(
        &server,
        "POST",
        "/v1/users/admin/password",
        Some(json!({ "password": PASSWORD })),
    )
    .await;
    console_user(&server, "vw", "viewer", &["team"]).await;
    console_user(&server, "op", "operator", &["team"]).await;
    console_user(&server, "bob", "viewer", &["team"]).await;
    let bobs_token = crate::access::admin(
        &server,
        "POST",
        "/v1/tokens",
        Some(json!({ "user": "bob", "label": "laptop" })),
    )
    .await["info"]["id"]
        .as_i64()
        .unwrap();
    let bob = || async { server.get("/v1/users/bob").await.1 };
    let before = bob().await;
    // What the Admin page does, each aimed at bob.
    let actions = [
        (
            "POST",
            "/v1/users/bob/role".to_owned(),
            Some(json!({ "role": "admin" })),
        ),
        (
            "POST",
            "/v1/users/bob/groups".into(),
            Some(json!({ "group": "web" })),
        ),
        ("DELETE", "/v1/users/bob/groups/team".into(), None),
        (
            "POST",
            "/v1/users/bob/password".into(),
            Some(json!({ "password": "taken over, sorry" })),
        ),
        ("DELETE", "/v1/users/bob".into(), None),
        (
            "POST",
            "/v1/tokens".into(),
            Some(json!({ "user": "bob", "label": "mine now" })),
        ),
        ("DELETE", format!("/v1/tokens/{bobs_token}"), None),
        (
            "POST",
            "/v1/users".into(),
            Some(json!({ "name": "mallory", "role": "admin" })),
        ),
        (
            "POST",
            "/v1/groups".into(),
            Some(json!({ "name": "all", "hostnames": ["*"] })),
        ),
        ("DELETE", "/v1/groups/web".into(), None),
    ];
    for user in ["vw", "op"] {
        let session = sign_in(&server, user, PASSWORD).await.unwrap();
        for (method, path, body) in &actions {
            let (status, answer) = with_cookie(
                &server,
                &session.cookie,
                Some(&session.csrf),
                method,
                path,
                body.clone(),
            )
            .await;
            // Someone else's token does not exist for a non-admin; everything else is the
            // admin's to do.
            let expected = if path.starts_with("/v1/tokens/") {
                404
            } else {
                403
            };
            assert_eq!(status, expected, "{user} {method} {path}: {answer}");
        }
        for path in [
            "/v1/users",
            "/v1/groups",
            "/v1/audit",
            "/v1/tokens?user=bob",
        ] {
            let (status, answer) =
                with_cookie(&server, &session.cookie, None, "GET", path, None).await;
            assert_eq!(status, 403, "{user} GET {path}: {answer}");
        }
    }
    // An admin's session without its CSRF token changes nothing either.
    let session = sign_in(&server, "admin", PASSWORD).await.unwrap();
    for (method, path, body) in &actions {
        let (status, answer) =
            with_cookie(&server, &session.cookie, None, method, path, body.clone()).await;
        assert_eq!(status, 403, "admin without CSRF {method} {path}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("CSRF"),
            "{answer}"
        );
    }
    assert_eq!(bob().await, before, "bob is as he was");
    let (_, users) = server.get("/v1/users").await;
    assert!(!users.to_string().contains("mallory"), "{users}");
    let (_, groups) = server.get("/v1/groups").await;
    assert_eq!(groups.as_array().unwrap().len(), 2, "{groups}");
    // With it, the admin's change is made (and bob's old password no longer works).
    let (status, answer) = with_cookie(
        &server,
        &session.cookie,
        Some(&session.csrf),
        "POST",
        "/v1/users/bob/password",
        Some(json!({ "password": "a new one for bob" })),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        sign_in(&server, "bob", PASSWORD).await.err().unwrap().0,
        401
    );
    sign_in(&server, "bob", "a new one for bob").await.unwrap();
}
