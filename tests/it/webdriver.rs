//! A tiny WebDriver client for the console's browser tests: Debian's headless `chromium` driven
//! through `/usr/bin/chromedriver` (W3C WebDriver over HTTP on loopback). Only what the tests
//! use: a session, navigation, finding elements by CSS, clicks, keys, text, scripts and
//! screenshots. Without chromium or chromedriver, [`Browser::start`] says why and the test is
//! skipped (it passes).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Debian's paths; `SNAPQ_CHROMEDRIVER` and `SNAPQ_CHROMIUM` name others.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

fn program(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}
/// How long a wait for something on the page lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);
/// The key WebDriver sends for Enter.
#[allow(dead_code)]
pub const ENTER: &str = "\u{E007}";

/// A WebDriver element reference.
#[derive(Debug, Clone)]
pub struct El(String);

pub struct Browser {
    http: reqwest::Client,
    base: String,
    driver: Child,
    name: String,
}

/// Where a browser test leaves its screenshots (under `target/`).
pub fn shots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless chromium session, or `None` (printing why) when
    /// they are not installed.
    pub async fn start(name: &str) -> Option<Browser> {
        let chromedriver = program("SNAPQ_CHROMEDRIVER", CHROMEDRIVER);
        let chromium = program("SNAPQ_CHROMIUM", CHROMIUM);
        for (what, path) in [("chromedriver", &chromedriver), ("chromium", &chromium)] {
            if !Path::new(path).exists() {
                eprintln!(
                    "SKIPPED browser test {name}: {what} is not installed at {path} (apt-get install chromium chromium-driver; .ci/run does)"
                );
                return None;
            }
        }
        snapq_core::agent_client::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        // chromedriver takes no port 0: pick a free one, and try another if it was taken
        // between our look and its bind.
        for _ in 0..5 {
            let port = free_port();
            let mut driver = Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver");
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut ready = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = driver.try_wait() {
                    break; // exited: the port was taken
                }
                if let Ok(r) = http.get(format!("{base}/status")).send().await
                    && let Ok(v) = r.json::<Value>().await
                    && v["value"]["ready"] == true
                {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !ready {
                let _ = driver.kill();
                let _ = driver.wait();
                continue;
            }
            let caps = json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": true,
                "unhandledPromptBehavior": "ignore",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1400,900",
                             "--ignore-certificate-errors", "--no-first-run"],
                    "prefs": { "download.default_directory": shots_dir().to_str().unwrap() },
                },
            }}});
            let created: Value = http
                .post(format!("{base}/session"))
                .json(&caps)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let Some(session) = created["value"]["sessionId"].as_str() else {
                let _ = driver.kill();
                panic!("chromedriver could not start chromium: {created}");
            };
            return Some(Browser {
                base: format!("{base}/session/{session}"),
                http,
                driver,
                name: name.to_owned(),
            });
        }
        panic!("chromedriver did not come up on a free port after 5 tries");
    }

    /// One WebDriver command: its `value`, or `Err` with the WebDriver error.
    pub async fn try_cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let response = request.send().await.expect("talking to chromedriver");
        let ok = response.status().is_success();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if ok {
            Ok(value["value"].clone())
        } else {
            Err(value["value"].clone())
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_cmd(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    pub async fn find_all(&self, css: &str) -> Vec<El> {
        let found = self
            .cmd(
                "POST",
                "/elements",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        found
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_object()?.values().next()?.as_str().map(str::to_owned))
            .map(El)
            .collect()
    }

    /// Waits until `css` matches an element and returns the first.
    pub async fn wait(&self, css: &str) -> El {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(el) = self.find_all(css).await.into_iter().next() {
                return el;
            }
            assert!(Instant::now() < deadline, "no element {css:?} on the page");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `check` of the texts of every `css` element holds; returns those texts.
    pub async fn wait_texts(
        &self,
        css: &str,
        what: &str,
        check: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut texts = Vec::new();
            for el in self.find_all(css).await {
                // An element replaced between the find and the read: look again.
                match self
                    .try_cmd("GET", &format!("/element/{}/text", el.0), Value::Null)
                    .await
                {
                    Ok(t) => texts.push(t.as_str().unwrap_or("").to_owned()),
                    Err(_) => {
                        texts.clear();
                        break;
                    }
                }
            }
            if check(&texts) {
                return texts;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} ({css}): {texts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the first `css` element's text contains `needle`; returns the text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        self.wait_texts(css, needle, |t| t.iter().any(|s| s.contains(needle)))
            .await
            .into_iter()
            .find(|s| s.contains(needle))
            .unwrap()
    }

    /// Clicks the first `css` element once there is one. Pages that refresh on a timer draw
    /// their rows again, so an element replaced between the find and the click is looked up
    /// again.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let el = self.wait(css).await;
            match self
                .try_cmd("POST", &format!("/element/{}/click", el.0), json!({}))
                .await
            {
                Ok(_) => return,
                Err(e) if e["error"] == "stale element reference" && Instant::now() < deadline => {}
                Err(e) => panic!("WebDriver click on {css:?}: {e}"),
            }
        }
    }

    pub async fn click_el(&self, el: &El) {
        self.cmd("POST", &format!("/element/{}/click", el.0), json!({}))
            .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.wait(css).await;
        self.cmd(
            "POST",
            &format!("/element/{}/value", el.0),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn clear(&self, css: &str) {
        let el = self.wait(css).await;
        self.cmd("POST", &format!("/element/{}/clear", el.0), json!({}))
            .await;
    }

    pub async fn text_of(&self, el: &El) -> String {
        self.cmd("GET", &format!("/element/{}/text", el.0), Value::Null)
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub async fn text(&self, css: &str) -> String {
        let el = self.wait(css).await;
        self.text_of(&el).await
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            json!({ "script": format!("const done = arguments[arguments.length - 1]; (async () => {{ {script} }})().then(done, (e) => done('ERROR ' + e));"), "args": args }),
        )
        .await
    }

    /// The text of an open alert/confirm/prompt dialog, if one is open.
    pub async fn alert_text(&self) -> Option<String> {
        self.try_cmd("GET", "/alert/text", Value::Null)
            .await
            .ok()
            .map(|v| v.as_str().unwrap_or("").to_owned())
    }

    pub async fn screenshot(&self, path: &Path) {
        let png = self.cmd("GET", "/screenshot", Value::Null).await;
        std::fs::write(path, base64_decode(png.as_str().unwrap())).unwrap();
    }

    /// Ends the session and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.try_cmd("DELETE", "", Value::Null).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Runs a browser test: skipped (passing) without a browser; on failure a screenshot of the
/// page goes to `target/tmp/console-screenshots/FAILED-<name>.png` before the panic goes on.
pub async fn with_browser(name: &str, test: impl AsyncFnOnce(&Browser)) {
    use futures::FutureExt;
    let Some(browser) = Browser::start(name).await else {
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(test(&browser))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let path = shots_dir().join(format!("FAILED-{}.png", browser.name));
        browser.screenshot(&path).await;
        eprintln!("screenshot of the failed page: {}", path.display());
        browser.quit().await;
        std::panic::resume_unwind(panic);
    }
    browser.quit().await;
}

/// Standard base64 (what WebDriver screenshots are), decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
