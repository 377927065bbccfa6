//! Paged snapshot listings (`GET /v1/snapshots` with `limit`/`before`, `GET /v1/snapshots/summary`
//! with `limit`/`after`): pages follow each other through the `Link` header, never show another
//! group's snapshots, and bad parameters are a 400 that says what to send.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::access::admin;
use crate::support::{TestServer, register_unreachable as register};

/// One GET as `token`: the status, the `rel="next"` URL of its `Link` header, and the JSON body.
async fn get_page(server: &TestServer, token: &str, path: &str) -> (u16, Option<String>, Value) {
    let response = server
        .request("GET", path)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let next = response
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned())
        .map(|link| {
            let (target, rel) = link.split_once(';').expect("`<URL>; rel=...`");
            assert_eq!(rel.trim(), "rel=\"next\"", "{link}");
            target.trim().trim_matches(['<', '>']).to_owned()
        });
    (status, next, response.json().await.unwrap())
}

/// Every page from `first` on: each page's body, in order.
async fn all_pages(server: &TestServer, token: &str, first: &str) -> Vec<Value> {
    let (mut pages, mut next) = (Vec::new(), Some(first.to_owned()));
    while let Some(path) = next {
        let (status, following, body) = get_page(server, token, &path).await;
        assert_eq!(status, 200, "{path}: {body}");
        pages.push(body);
        next = following;
        assert!(pages.len() < 20, "the pages never end");
    }
    pages
}

/// The snapshot ids of a `/v1/snapshots` page, in the order shown, with their hostnames.
fn rows(page: &Value) -> Vec<(String, i64)> {
    page.as_array()
        .unwrap()
        .iter()
        .flat_map(|g| {
            let host = g["hostname"].as_str().unwrap().to_owned();
            g["snapshots"].as_array().unwrap().iter().map(move |s| {
                assert_eq!(
                    s["hostname"],
                    host.as_str(),
                    "a snapshot in another's group"
                );
                (host.clone(), s["id"].as_i64().unwrap())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_listings_page_through_link_headers_within_the_callers_groups() {
    let server = TestServer::spawn_with(&["--job-max-attempts", "1"]);
    for (host, ip) in [
        ("pg-in-1", "10.5.0.1"),
        ("pg-in-2", "10.5.0.2"),
        ("pg-out-1", "10.6.0.1"),
    ] {
        register(&server, host, ip).await;
    }
    admin(
        &server,
        "POST",
        "/v1/groups",
        Some(json!({ "name": "team", "hostnames": ["pg-in-*"] })),
    )
    .await;
    admin(
        &server,
        "POST",
        "/v1/users",
        Some(json!({ "name": "op", "role": "operator", "groups": ["team"] })),
    )
    .await;
    let made = admin(&server, "POST", "/v1/tokens", Some(json!({ "user": "op" }))).await;
    let op = made["token"].as_str().unwrap().to_owned();
    // Interleaved, so one endpoint's snapshots are not neighbours by id: pg-in-1 three,
    // pg-in-2 two, pg-out-1 three.
    let mut ids: Vec<(String, i64)> = Vec::new();
    for hosts in [
        json!(["pg-in-1", "pg-out-1", "pg-in-2"]),
        json!(["pg-out-1", "pg-in-1"]),
        json!(["pg-in-2", "pg-out-1", "pg-in-1"]),
    ] {
        let queued = admin(
            &server,
            "POST",
            "/v1/captures",
            Some(json!({ "hosts": hosts })),
        )
        .await;
        for q in queued.as_array().unwrap() {
            ids.push((
                q["hostname"].as_str().unwrap().to_owned(),
                q["snapshot_id"].as_i64().unwrap(),
            ));
        }
    }
    let inside: Vec<i64> = {
        let mut v: Vec<i64> = ids
            .iter()
            .filter(|(h, _)| h.starts_with("pg-in-"))
            .map(|(_, id)| *id)
            .collect();
        v.sort_unstable_by_key(|id| std::cmp::Reverse(*id));
        v
    };
    assert_eq!(inside.len(), 5);

    // Pages of two, newest first, followed through `Link`: every inside snapshot once, in id
    // order, none of the outside endpoint's.
    let pages = all_pages(&server, &op, "/v1/snapshots?limit=2").await;
    assert_eq!(pages.len(), 3, "{pages:?}");
    let mut seen = Vec::new();
    for page in &pages {
        let mut page_rows = rows(page);
        assert!(page_rows.len() <= 2, "{page}");
        assert!(
            page_rows.iter().all(|(h, _)| h.starts_with("pg-in-")),
            "{page}"
        );
        // Within a page, groups by hostname; across pages, newest first by id.
        page_rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        seen.extend(page_rows.into_iter().map(|(_, id)| id));
    }
    assert_eq!(seen, inside, "pages of two, newest first");
    let (_, next, first) = get_page(&server, &op, "/v1/snapshots?limit=2").await;
    let next = next.expect("a next page");
    assert!(next.starts_with("/v1/snapshots?"), "{next}");
    assert!(
        next.contains("limit=2") && next.contains(&format!("before={}", inside[1])),
        "{next}"
    );
    assert_eq!(rows(&first).len(), 2);

    // One endpoint's snapshots, paged by the same cursor; its group counts all its captures.
    let one = all_pages(&server, &op, "/v1/snapshots?endpoint=pg-in-1&limit=2").await;
    let one_ids: Vec<i64> = one
        .iter()
        .flat_map(|p| rows(p).into_iter().map(|(_, id)| id))
        .collect();
    let expect: Vec<i64> = inside
        .iter()
        .copied()
        .filter(|id| ids.contains(&("pg-in-1".to_owned(), *id)))
        .collect();
    assert_eq!(one.len(), 2);
    assert_eq!(one_ids, expect);
    let (_, _, older) = get_page(
        &server,
        &op,
        &format!("/v1/snapshots?endpoint=pg-in-1&before={}", expect[1]),
    )
    .await;
    assert_eq!(rows(&older), [("pg-in-1".to_owned(), expect[2])]);

    // Without `limit`, everything the caller sees, grouped by hostname, and no `Link`.
    let (status, next, all) = get_page(&server, &op, "/v1/snapshots").await;
    assert_eq!((status, next), (200, None));
    let hosts: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["pg-in-1", "pg-in-2"]);
    assert_eq!(rows(&all).len(), 5);
    let (_, _, admins) = get_page(&server, &server.token, "/v1/snapshots").await;
    assert_eq!(
        rows(&admins).len(),
        8,
        "the admin sees the outside endpoint's too"
    );

    // The summary: one row per endpoint by hostname, a page of one at a time.
    let pages = all_pages(&server, &op, "/v1/snapshots/summary?limit=1").await;
    let summary: Vec<(String, i64)> = pages
        .iter()
        .flat_map(|p| p.as_array().unwrap().clone())
        .map(|s| {
            (
                s["hostname"].as_str().unwrap().to_owned(),
                s["snapshots"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("pg-in-1".to_owned(), 3), ("pg-in-2".to_owned(), 2)]
    );
    let first = &pages[0][0];
    assert_eq!(first["latest_id"], expect[0]);
    let states: i64 = first["states"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_i64().unwrap())
        .sum();
    assert_eq!(states, 3, "{first}");
    assert_eq!(
        first["captures"], 0,
        "no capture of an unreachable endpoint completes"
    );
    let (_, next, _) = get_page(&server, &op, "/v1/snapshots/summary?limit=1").await;
    assert_eq!(
        next.as_deref(),
        Some("/v1/snapshots/summary?limit=1&after=pg-in-1")
    );
    let (_, _, admins) = get_page(&server, &server.token, "/v1/snapshots/summary").await;
    assert_eq!(admins.as_array().unwrap().len(), 3);

    // Another group's endpoint does not exist for this caller, whichever way it is asked.
    for path in [
        "/v1/snapshots?endpoint=pg-out-1&limit=1",
        "/v1/snapshots/summary?endpoint=pg-out-1",
    ] {
        let (status, _, body) = get_page(&server, &op, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }

    // Bad parameters: a 400 naming the parameter; a limit over the largest page is served as
    // the largest page.
    for path in [
        "/v1/snapshots?limit=0",
        "/v1/snapshots?limit=-1",
        "/v1/snapshots?limit=ten",
        "/v1/snapshots?limit=99999999999",
        "/v1/snapshots?before=newest",
        "/v1/snapshots?limit=2&before=1.5",
        "/v1/snapshots/summary?limit=0",
        "/v1/snapshots/summary?limit=",
    ] {
        let (status, next, body) = get_page(&server, &op, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(next, None);
        let error = body["error"].as_str().unwrap();
        let param = if path.contains("before") {
            "before"
        } else {
            "limit"
        };
        assert!(error.contains(param), "{path}: {error}");
    }
    let (status, next, body) = get_page(&server, &op, "/v1/snapshots?limit=5000").await;
    assert_eq!((status, next), (200, None), "{body}");
    assert_eq!(rows(&body).len(), 5);

    // The CLI still lists everything (it follows the pages).
    let (code, out, err) = server.cli(&["snapshots", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let listed: BTreeSet<i64> = rows(&listed).into_iter().map(|(_, id)| id).collect();
    let all_ids: BTreeSet<i64> = ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(listed, all_ids);
}
