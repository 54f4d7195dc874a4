//! The web console against the real binary: its JSON API (filters,
//! search, one transaction with its commands, the actions, live updates,
//! errors, and the admin rule under a policy), and the page itself driven
//! end to end in headless Chromium (Debian's `chromium` and
//! `chromium-driver`): open the list, open a transaction, retry it, watch
//! its state change; a change made elsewhere shows up live; with a policy,
//! the token form; over TLS (HTTP/2), signing in and acting. A live list
//! that falls behind is told to read the list again.
//!
//! Where Chromium is not installed the browser tests print, loudly, that
//! they were skipped; with `TCC_REQUIRE_BROWSER=1` (set by `.ci/run`) they
//! fail instead. `TCC_CONSOLE_SCREENSHOT=path.png` saves a screenshot of a
//! transaction's page (the README's), `TCC_CONSOLE_LIST_SCREENSHOT` one of
//! the list.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Coordinator, TestParticipant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long the browser may take to show something.
const SHOWN: Duration = Duration::from_secs(20);

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("HTTP client")
}

/// `GET path` with an optional bearer token: the status and the JSON body.
async fn get_json(c: &Coordinator, path: &str, token: Option<&str>) -> Result<(u16, Value)> {
    let mut req = http().get(format!("{}{path}", c.url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let body = res.json::<Value>().await.with_context(|| format!("GET {path}: not JSON"))?;
    Ok((status, body))
}

/// `POST path` with a JSON body: the status and the JSON body.
async fn post_json(c: &Coordinator, path: &str, body: Value, token: Option<&str>) -> Result<(u16, Value)> {
    let mut req = http().post(format!("{}{path}", c.url())).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    Ok((status, res.json::<Value>().await.with_context(|| format!("POST {path}: not JSON"))?))
}

fn ids(list: &Value) -> Vec<String> {
    list["transactions"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["transaction_id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

async fn confirm(c: &Coordinator, id: &str, wait: bool) -> Result<v1::Transaction> {
    let req = v1::ConfirmRequest { transaction_id: id.into(), wait, wait_timeout_ms: 20_000 };
    c.transactions().await?.confirm(req).await?.into_inner().transaction.context("no transaction")
}

fn command(kind: &str, key: &str, payload: &[u8]) -> v1::Command {
    v1::Command { r#type: kind.into(), key: key.into(), payload: payload.to_vec() }
}

#[tokio::test]
async fn the_console_api_lists_searches_shows_acts_and_streams() -> Result<()> {
    let c = Coordinator::start(&[]).await?;
    let p = TestParticipant::start().await?;
    c.register("orders", &p).await?;
    let t = c.begin(&["orders"], 60_000).await?;
    let partial = t.partials.first().context("no partial")?.clone();
    c.append(
        &partial.partial_id,
        vec![
            command("orders.Create", "o-1", br#"{"sku":"apple","qty":2}"#),
            command("orders.Note", "o-1", b"gift wrap\n"),
            command("orders.Blob", "o-1", &[0x0a, 0xff, 0x00]),
        ],
        "",
    )
    .await?;
    let id = t.transaction_id.clone();

    // The page and its assets, with a policy that allows nothing foreign.
    let page = http().get(c.url()).send().await?;
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers().get("content-security-policy").context("no CSP")?.to_str()?.to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await?.contains("console.js"));
    for asset in ["/console.js", "/console.css"] {
        let res = http().get(format!("{}{asset}", c.url())).send().await?;
        assert_eq!(res.status().as_u16(), 200, "{asset}");
        assert!(!res.text().await?.trim().is_empty(), "{asset} is empty");
    }

    // The list and its filters; live state, never cached.
    let res = http().get(format!("{}/api/transactions", c.url())).send().await?;
    assert_eq!(res.headers().get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"));
    let (status, all) = get_json(&c, "/api/transactions", None).await?;
    assert_eq!(status, 200, "{all}");
    assert_eq!(ids(&all), vec![id.clone()]);
    assert_eq!(all["transactions"][0]["state"], "ACTIVE");
    assert_eq!(all["transactions"][0]["participants"][0]["command_count"], 3);
    for (query, found) in [
        ("states=ACTIVE", true),
        ("states=CONFIRMED,CANCELLED", false),
        ("service=orders", true),
        ("service=payments", false),
        ("min_age_ms=3600000", false),
    ] {
        let (status, list) = get_json(&c, &format!("/api/transactions?{query}"), None).await?;
        assert_eq!(status, 200, "{query}: {list}");
        assert_eq!(ids(&list).contains(&id), found, "{query}: {list}");
    }
    let (status, err) = get_json(&c, "/api/transactions?states=DONE", None).await?;
    assert_eq!((status, err["code"].as_str()), (400, Some("INVALID_ARGUMENT")), "{err}");
    assert!(err["message"].as_str().unwrap_or("").contains("\"DONE\" is not a state"), "{err}");
    let (status, err) = get_json(&c, "/api/transactions?color=red", None).await?;
    assert_eq!(status, 400, "{err}");
    assert!(err["message"].as_str().unwrap_or("").contains("unknown query parameter \"color\""), "{err}");

    // Search by transaction id and by partial id.
    for q in [&id, &partial.partial_id] {
        let (status, found) = get_json(&c, &format!("/api/search?q={q}"), None).await?;
        assert_eq!((status, found["transaction_id"].as_str()), (200, Some(id.as_str())), "{q}: {found}");
    }
    let (status, err) = get_json(&c, &format!("/api/search?q={}", uuid::Uuid::new_v4()), None).await?;
    assert_eq!((status, err["code"].as_str()), (404, Some("NOT_FOUND")), "{err}");
    let (status, err) = get_json(&c, "/api/search?q=not-an-id", None).await?;
    assert_eq!((status, err["code"].as_str()), (400, Some("INVALID_ARGUMENT")), "{err}");

    // One transaction, with its commands shown as JSON, text and hex.
    let (status, detail) = get_json(&c, &format!("/api/transactions/{id}"), None).await?;
    assert_eq!(status, 200, "{detail}");
    let cmds = &detail["commands"]["orders"]["commands"];
    assert_eq!(cmds[0]["payload_json"], json!({"sku": "apple", "qty": 2}), "{detail}");
    assert_eq!(cmds[1]["payload_text"], "gift wrap\n", "{detail}");
    assert_eq!((cmds[2]["payload_text"].is_null(), cmds[2]["payload_hex"].as_str()), (true, Some("0aff00")));
    assert_eq!(detail["history"][0]["cause"], "begun");
    let (status, _) = get_json(&c, &format!("/api/transactions/{}", uuid::Uuid::now_v7()), None).await?;
    assert_eq!(status, 404);

    // The endpoints and the summary.
    let (_, endpoints) = get_json(&c, "/api/endpoints", None).await?;
    assert_eq!(endpoints["endpoints"][0]["service"], "orders", "{endpoints}");
    assert_eq!(endpoints["endpoints"][0]["endpoint"], p.url(), "{endpoints}");
    let (_, summary) = get_json(&c, "/api/summary", None).await?;
    assert_eq!(
        (summary["counts"]["ACTIVE"].as_u64(), summary["access"].as_str()),
        (Some(1), Some("open")),
        "{summary}"
    );
    let begun =
        summary["metrics"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "tcc_transactions_begun_total"));
    assert!(begun.is_some_and(|m| m["value"].as_f64() >= Some(1.0)), "{summary}");

    // Live: the current state first, then each change until it is finished.
    let mut stream = http().get(format!("{}/api/watch?transaction_id={id}", c.url())).send().await?;
    assert_eq!(
        stream.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream"),
        "the watch is not an event stream"
    );
    confirm(&c, &id, false).await?;
    let mut text = String::new();
    let seen = tokio::time::timeout(SHOWN, async {
        while let Some(chunk) = stream.chunk().await? {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        anyhow::Ok(())
    })
    .await;
    assert!(seen.is_ok(), "the stream did not end once CONFIRMED: {text}");
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|t| t["state"].as_str().map(str::to_string))
        .collect();
    assert_eq!(states.first().map(String::as_str), Some("ACTIVE"), "{text}");
    assert_eq!(states.last().map(String::as_str), Some("CONFIRMED"), "{text}");

    // Actions: JSON only; the state decides; the cancel reason is kept.
    let t2 = c.begin(&["orders"], 60_000).await?;
    let cancel = format!("/api/transactions/{}/cancel", t2.transaction_id);
    let plain = http().post(format!("{}{cancel}", c.url())).body("reason=x").send().await?;
    assert_eq!(plain.status().as_u16(), 415, "a form post must not act");
    let (status, err) = post_json(&c, &cancel, json!({"reason": 7}), None).await?;
    assert_eq!(status, 400, "{err}");
    let (status, txn) = post_json(&c, &cancel, json!({"reason": "customer called"}), None).await?;
    assert_eq!(status, 200, "{txn}");
    assert!(["CANCELLING", "CANCELLED"].contains(&txn["state"].as_str().unwrap_or("")), "{txn}");
    assert!(
        txn["history"].as_array().is_some_and(|h| h.iter().any(|e| e["cause"] == "cancel: customer called")),
        "{txn}"
    );
    let (status, err) = post_json(&c, &format!("/api/transactions/{id}/retry"), json!({}), None).await?;
    assert_eq!((status, err["code"].as_str()), (409, Some("FAILED_PRECONDITION")), "{err}");
    let (status, err) = post_json(&c, &format!("/api/transactions/{id}/explode"), json!({}), None).await?;
    assert_eq!(status, 404, "{err}");
    // Another web page gets nothing: one that names itself in Origin, and
    // one whose own name was pointed at this port (DNS rebinding).
    let t3 = c.begin(&["orders"], 60_000).await?;
    let cancel3 = format!("{}/api/transactions/{}/cancel", c.url(), t3.transaction_id);
    let foreign = http().post(&cancel3).header("origin", "http://evil.example").json(&json!({})).send().await?;
    assert_eq!(foreign.status().as_u16(), 403, "{}", foreign.text().await?);
    let rebound = http().post(&cancel3).header("host", "evil.example").json(&json!({})).send().await?;
    assert_eq!(rebound.status().as_u16(), 403, "{}", rebound.text().await?);
    let read = http().get(format!("{}/api/transactions", c.url())).header("host", "evil.example").send().await?;
    let body: Value = read.json().await?;
    assert_eq!(body["code"], "PERMISSION_DENIED", "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("localhost"), "{body}");
    let req = v1::GetRequest { transaction_id: t3.transaction_id.clone() };
    let still = c.transactions().await?.get(req).await?.into_inner();
    assert_eq!(still.state, S::Active as i32, "another page cancelled a transaction");
    assert!(c.logs().contains("operator action from the console"), "the action is not logged");
    Ok(())
}

#[tokio::test]
async fn a_live_list_that_falls_behind_is_told_to_read_the_list_again() -> Result<()> {
    let c = Coordinator::start(&[]).await?;
    // A watcher of every transaction that reads nothing for now, over a
    // socket with a small receive buffer, so that the server backs up.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(c.addr()).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            bail!("the watch closed before its headers: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    // Far more changes than the backlog, the stream's queue and the
    // socket buffers hold (each Begin is one change, of 32 participants:
    // about 6 kB of JSON), 64 at a time.
    let total = tcc_coordinator::engine::WATCH_BACKLOG * 2;
    let services: Vec<String> = (0..32).map(|i| format!("service-{i}")).collect();
    let channel = c.channel().await?;
    let mut begun = 0;
    while begun < total {
        let batch = (0..64).map(|_| {
            let mut tx = v1::transactions_client::TransactionsClient::new(channel.clone());
            let participants = services.clone();
            async move { tx.begin(v1::BeginRequest { participants, timeout_ms: 600_000 }).await }
        });
        for r in futures::future::join_all(batch).await {
            r?;
        }
        begun += 64;
    }
    // Now read: somewhere in the stream is word that changes were skipped,
    // and after it the stream goes on.
    let mut text = String::new();
    let found = tokio::time::timeout(SHOWN, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!("the stream ended");
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            const RESYNC: &str = "event: resync\ndata: ";
            if let Some(at) = text.find(RESYNC) {
                // Once its line is whole.
                if let Some((missed, _)) = text[at + RESYNC.len()..].split_once('\n') {
                    return anyhow::Ok(missed.trim().parse::<u64>().unwrap_or(0));
                }
            }
        }
    })
    .await;
    let missed = match found {
        Ok(Ok(missed)) => missed,
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("no resync event within {SHOWN:?} after {total} changes; read {} bytes", text.len()),
    };
    assert!(missed > 0, "a resync that missed nothing");
    assert!(c.logs().contains("fell behind"), "the lag is not logged");
    Ok(())
}

#[tokio::test]
async fn with_a_policy_the_console_api_needs_an_admin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (policy, tokens) = (dir.path().join("policy.toml"), dir.path().join("tokens"));
    std::fs::write(&policy, "admin = [\"ops\"]\n[composite]\nshop = \"own\"\n")?;
    std::fs::write(&tokens, "ops s3cret-ops-0123456789\nshop s3cret-shop-0123456789\n")?;
    let c = Coordinator::start(&["--policy", &policy.to_string_lossy(), "--tokens", &tokens.to_string_lossy()]).await?;

    let page = http().get(c.url()).send().await?;
    assert_eq!(page.status().as_u16(), 200, "the page holds no data and is open");
    let (status, err) = get_json(&c, "/api/summary", None).await?;
    assert_eq!((status, err["code"].as_str()), (401, Some("UNAUTHENTICATED")), "{err}");
    let (status, err) = get_json(&c, "/api/summary", Some("wrong-token-0123456789")).await?;
    assert_eq!(status, 401, "{err}");
    let (status, err) = get_json(&c, "/api/transactions", Some("s3cret-shop-0123456789")).await?;
    assert_eq!((status, err["code"].as_str()), (403, Some("PERMISSION_DENIED")), "{err}");
    assert!(err["message"].as_str().unwrap_or("").contains("needs the admin role"), "{err}");
    let (status, err) = post_json(
        &c,
        &format!("/api/transactions/{}/retry", uuid::Uuid::now_v7()),
        json!({}),
        Some("s3cret-shop-0123456789"),
    )
    .await?;
    assert_eq!(status, 403, "{err}");
    let watch = http().get(format!("{}/api/watch", c.url())).send().await?;
    assert_eq!(watch.status().as_u16(), 401, "the live stream needs an identity too");
    let (status, summary) = get_json(&c, "/api/summary", Some("s3cret-ops-0123456789")).await?;
    assert_eq!((status, summary["access"].as_str()), (200, Some("policy")), "{summary}");
    assert!(c.logs().contains("Console.Summary"), "a refusal names the console call");
    Ok(())
}

// ------------------------------------------------------------- the browser

/// Chromium driven by chromedriver, in a process group of their own that
/// is killed when this is dropped (a failed test leaves no browser behind).
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = self.driver.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

fn browser_required() -> bool {
    std::env::var("TCC_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

impl Browser {
    /// `None` (said loudly) where Chromium or chromedriver is missing and
    /// the browser is not required.
    async fn start() -> Result<Option<Self>> {
        // TCC_CHROMIUM names another browser binary (a test of the skip).
        let chromium = std::env::var("TCC_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let (chromium, driver) = (std::path::Path::new(&chromium), std::path::Path::new("/usr/bin/chromedriver"));
        if !chromium.exists() || !driver.exists() {
            if browser_required() {
                bail!("TCC_REQUIRE_BROWSER=1 but {} or /usr/bin/chromedriver is missing", chromium.display());
            }
            tcc_tests::say_skipped(
                "the console's browser test needs Debian's chromium and chromium-driver \
                 (apt-get install -y chromium chromium-driver); .ci/run installs them",
            );
            return Ok(None);
        }
        let port = tcc_tests::free_port()?;
        let mut driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let stdout = driver.stdout.take().context("chromedriver stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(SHOWN, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("started successfully") {
                    return anyhow::Ok(());
                }
            }
            bail!("chromedriver exited before it was ready")
        })
        .await
        .context("chromedriver did not start")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = tempfile::tempdir()?;
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        // The TLS test's coordinator has a certificate from a CA made in
        // the test, which the browser does not know.
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic",
                    "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("starting a Chromium session")?;
        Ok(Some(Browser { client, driver, _profile: profile }))
    }

    /// The element at `css`, once it is there.
    async fn find(&self, css: &str) -> Result<fantoccini::elements::Element> {
        self.client.wait().at_most(SHOWN).for_element(Locator::Css(css)).await.with_context(|| format!("no {css}"))
    }

    /// Waits until the element with id `id` shows exactly `text`.
    async fn wait_text(&self, id: &str, text: &str) -> Result<()> {
        let xpath = format!("//*[@id='{id}' and normalize-space(.)='{text}']");
        let found = self.client.wait().at_most(SHOWN).for_element(Locator::XPath(&xpath)).await;
        if found.is_err() {
            let now = self.client.find(Locator::Id(id)).await.ok();
            let shown = match now {
                Some(e) => e.text().await.unwrap_or_default(),
                None => "(missing)".to_string(),
            };
            bail!("#{id} did not show {text:?} within {SHOWN:?}; it shows {shown:?}");
        }
        Ok(())
    }

    /// Waits until the element at `css` shows exactly `text`.
    async fn wait_css_text(&self, css: &str, text: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + SHOWN;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                last = e.text().await.unwrap_or_default();
                if last.trim() == text {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{css} did not show {text:?} within {SHOWN:?}; it shows {last:?}");
            }
            // The browser has no event to await from here: poll the DOM.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until exactly `n` elements match `css`.
    async fn wait_count(&self, css: &str, n: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + SHOWN;
        loop {
            let found = self.client.find_all(Locator::Css(css)).await?.len();
            if found == n {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{found} elements match {css} after {SHOWN:?}, not {n}");
            }
            // As in wait_css_text: the DOM is polled.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the session (Chromium exits), then the rest goes with the
    /// process group.
    async fn close(self) -> Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

#[tokio::test]
async fn in_chromium_the_console_opens_a_failed_transaction_retries_it_and_updates_live() -> Result<()> {
    let Some(browser) = Browser::start().await? else { return Ok(()) };
    let c = Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "100"]).await?;
    let (orders, stock) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("orders", &orders).await?;
    c.register("stock", &stock).await?;

    // One transaction that fails to confirm (stock refuses), one left active.
    stock.refuse(true);
    let failed = c.begin(&["orders", "stock"], 60_000).await?;
    for p in &failed.partials {
        let payload = format!(r#"{{"service":"{}","sku":"apple","qty":2}}"#, p.service);
        c.append(&p.partial_id, vec![command(&format!("{}.Reserve", p.service), "apple", payload.as_bytes())], "")
            .await?;
    }
    let id = failed.transaction_id.clone();
    assert_eq!(confirm(&c, &id, true).await?.state, S::FailedToConfirm as i32);
    let active = c.begin(&["orders"], 60_000).await?;

    // The list shows both, with their states.
    browser.client.goto(&c.url()).await?;
    browser.find(&format!("tr.txn-row[data-txn-id='{id}']")).await?;
    browser.wait_css_text(&format!("tr.txn-row[data-txn-id='{id}'] td.state"), "FAILED_TO_CONFIRM").await?;
    let active_state = format!("tr.txn-row[data-txn-id='{}'] td.state", active.transaction_id);
    browser.wait_css_text(&active_state, "ACTIVE").await?;
    browser.wait_css_text("[data-count-state='FAILED_TO_CONFIRM']", "1").await?;
    if let Ok(path) = std::env::var("TCC_CONSOLE_LIST_SCREENSHOT") {
        std::fs::write(&path, browser.client.screenshot().await?).with_context(|| format!("writing {path}"))?;
    }

    // A change made elsewhere shows up without a reload.
    let req = v1::CancelRequest {
        transaction_id: active.transaction_id.clone(),
        reason: "changed from outside".into(),
        wait: true,
        wait_timeout_ms: 20_000,
    };
    c.transactions().await?.cancel(req).await?;
    browser.wait_css_text(&active_state, "CANCELLED").await?;

    // The filter narrows the list.
    browser.find("select#filter-state option[value='FAILED_TO_CONFIRM']").await?.click().await?;
    browser.find("button#filter-apply").await?.click().await?;
    browser.wait_count("tr.txn-row", 1).await?;
    browser.wait_css_text(&format!("tr.txn-row[data-txn-id='{id}'] td.state"), "FAILED_TO_CONFIRM").await?;

    // Open the failed one: participants, the error, the history, the commands.
    browser.find(&format!("tr.txn-row[data-txn-id='{id}'] a.txn-link")).await?.click().await?;
    browser.wait_text("txn-state", "FAILED_TO_CONFIRM").await?;
    browser.wait_css_text("#participants tr[data-service='stock'] td.status", "FAILED").await?;
    browser.wait_css_text("#participants tr[data-service='orders'] td.status", "ACKNOWLEDGED").await?;
    let error = browser.find("#participants tr[data-service='stock'] td.last-error").await?.text().await?;
    assert!(!error.trim().is_empty(), "the failed participant shows no error");
    let history = browser.client.find_all(Locator::Css("ol#history li")).await?;
    assert!(history.len() >= 3, "history has {} entries", history.len());
    let payloads = browser.find("section#commands").await?.text().await?;
    assert!(payloads.contains("\"sku\"") && payloads.contains("stock.Reserve"), "commands not shown: {payloads}");
    assert!(
        browser.client.find(Locator::Css("button.resolve")).await.is_ok(),
        "no resolve button for a FAILED participant"
    );
    if let Ok(path) = std::env::var("TCC_CONSOLE_SCREENSHOT") {
        std::fs::write(&path, browser.client.screenshot().await?).with_context(|| format!("writing {path}"))?;
    }

    // Retry, behind a confirmation; the state changes on the page by itself.
    stock.refuse(false);
    browser.find("button#action-retry").await?.click().await?;
    let dialog = browser.find("dialog#confirm[open]").await?;
    let asks = dialog.find(Locator::Css("#confirm-text")).await?.text().await?;
    assert!(asks.contains(&id), "the confirmation does not name the transaction: {asks}");
    assert_eq!(stock.calls().iter().filter(|c| c.acked).count(), 0, "acted before the confirmation");
    browser.find("button#confirm-ok").await?.click().await?;
    browser.wait_text("txn-state", "CONFIRMED").await?;
    browser.wait_css_text("#participants tr[data-service='stock'] td.status", "ACKNOWLEDGED").await?;
    let commits = stock.wait_for("the retried commit", |calls| calls.iter().any(|c| c.acked)).await?;
    let commit = commits.iter().find(|c| c.acked).context("no acked commit")?;
    assert_eq!(commit.commands[0].r#type, "stock.Reserve");
    let history = browser.find("ol#history").await?.text().await?;
    assert!(history.contains("retry"), "the retry is not in the history: {history}");
    browser.close().await
}

#[tokio::test]
async fn in_chromium_the_console_asks_for_a_token_under_a_policy() -> Result<()> {
    let Some(browser) = Browser::start().await? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let (policy, tokens) = (dir.path().join("policy.toml"), dir.path().join("tokens"));
    std::fs::write(&policy, "admin = [\"ops\"]\n[composite]\nshop = \"own\"\n")?;
    std::fs::write(&tokens, "ops s3cret-ops-0123456789\nshop s3cret-shop-0123456789\n")?;
    let c = Coordinator::start(&["--policy", &policy.to_string_lossy(), "--tokens", &tokens.to_string_lossy()]).await?;
    let shop = "s3cret-shop-0123456789";
    let mut txns = c.transactions().await?;
    let mut begin = tonic::Request::new(v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 60_000 });
    begin.metadata_mut().insert("authorization", format!("Bearer {shop}").parse()?);
    let t = txns.begin(begin).await?.into_inner();

    browser.client.goto(&c.url()).await?;
    let token = browser.find("#login input#token").await?;
    token.send_keys("s3cret-ops-0123456789").await?;
    browser.find("button#login-go").await?.click().await?;
    browser.wait_css_text(&format!("tr.txn-row[data-txn-id='{}'] td.state", t.transaction_id), "ACTIVE").await?;
    browser.close().await
}

#[tokio::test]
async fn in_chromium_over_tls_the_console_signs_in_with_a_token_and_acts() -> Result<()> {
    let Some(browser) = Browser::start().await? else { return Ok(()) };
    // Mutual TLS with a policy; tokens make the client certificate
    // optional, so the browser signs in with the operator's token. Over
    // TLS the browser speaks HTTP/2, where the host is the request's
    // authority, not a Host header.
    let dir = tempfile::tempdir()?;
    let pki = tcc_demo_services::pki::Pki::new("test CA")?;
    let options = tcc_demo_services::pki::Options::default();
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem())?;
    let (cert, key) = pki.write(dir.path(), "tcc-coordinator", &options)?;
    let (shop_cert, shop_key) = pki.write(dir.path(), "shop", &options)?;
    let (policy, tokens) = (dir.path().join("policy.toml"), dir.path().join("tokens"));
    std::fs::write(&policy, "admin = [\"ops\"]\n[composite]\nshop = \"own\"\n")?;
    std::fs::write(&tokens, "ops s3cret-ops-0123456789\n")?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let c = Coordinator::start(&[
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--tls-client-ca",
        &path(&dir.path().join("ca.pem")),
        "--policy",
        &path(&policy),
        "--tokens",
        &path(&tokens),
    ])
    .await?;
    let url = format!("https://{}", c.addr());
    let shop = tcc_domain_sdk::tls::Tls::from_files(&shop_cert, &shop_key, &dir.path().join("ca.pem"))?;
    let mut txns = v1::transactions_client::TransactionsClient::new(shop.endpoint(&url)?.connect().await?);
    let req = v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 60_000 };
    let t = txns.begin(req).await?.into_inner();
    let id = t.transaction_id.clone();

    browser.client.goto(&format!("{url}/")).await?;
    browser.find("#login input#token").await?.send_keys("s3cret-ops-0123456789").await?;
    browser.find("button#login-go").await?.click().await?;
    browser.wait_css_text(&format!("tr.txn-row[data-txn-id='{id}'] td.state"), "ACTIVE").await?;
    browser.find(&format!("tr.txn-row[data-txn-id='{id}'] a.txn-link")).await?.click().await?;
    browser.wait_text("txn-state", "ACTIVE").await?;
    browser.find("button#action-cancel").await?.click().await?;
    browser.find("dialog#confirm[open] input#confirm-reason").await?.send_keys("wrong address").await?;
    browser.find("button#confirm-ok").await?.click().await?;
    // No endpoint of "orders" is known: the rollback waits, CANCELLING.
    browser.wait_text("txn-state", "CANCELLING").await?;
    let history = browser.find("ol#history").await?.text().await?;
    assert!(
        history.contains("cancel: wrong address (cancelled from the console by ops)"),
        "the history does not say who cancelled: {history}"
    );
    let state = txns.get(v1::GetRequest { transaction_id: id }).await?.into_inner().state;
    assert_eq!(state, S::Cancelling as i32);
    browser.close().await
}

/// Without a browser a browser test is skipped, and says so where a
/// person sees it: before, its banner went through `eprintln!`, which the
/// test harness captures, so a skipped test printed only `ok`. This runs
/// one browser test of this binary again with the browser missing.
#[tokio::test]
async fn a_browser_test_without_a_browser_says_it_was_skipped() -> Result<()> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "in_chromium_the_console_asks_for_a_token_under_a_policy"])
        .env("TCC_CHROMIUM", "/nonexistent/chromium")
        .env_remove("TCC_REQUIRE_BROWSER")
        .kill_on_drop(true)
        .output()
        .await?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(stderr.contains("*** SKIPPED: the console's browser test needs Debian's chromium"), "{stderr}");
    // Where the browser is required, its absence fails instead.
    let required = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "in_chromium_the_console_asks_for_a_token_under_a_policy"])
        .env("TCC_CHROMIUM", "/nonexistent/chromium")
        .env("TCC_REQUIRE_BROWSER", "1")
        .kill_on_drop(true)
        .output()
        .await?;
    assert!(!required.status.success());
    Ok(())
}
