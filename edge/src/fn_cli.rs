//! What `millrace-edge fn …` prints: tables and short lines for people; the API's JSON with
//! `--json`.

use std::time::Duration;

use anyhow::{Context, bail};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

/// How a command's answer is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shown {
    List,
    Show,
    Logs,
    Deployed,
    Invoked,
    Changed(&'static str),
    Kv,
}

/// Renders an API answer for people.
pub(crate) fn render(shown: Shown, name: Option<&str>, v: &Value) -> String {
    match shown {
        Shown::List => list(v["functions"].as_array().map_or(&[][..], Vec::as_slice)),
        Shown::Show => show(v),
        Shown::Logs => logs(v["invocations"].as_array().map_or(&[][..], Vec::as_slice)),
        Shown::Deployed => format!(
            "{} {} version {} (sha256 {}…)",
            if v["version"] == 1 {
                "deployed"
            } else {
                "updated"
            },
            v["name"].as_str().unwrap_or_default(),
            v["version"],
            &v["sha256"].as_str().unwrap_or_default()
                [..12.min(v["sha256"].as_str().map_or(0, str::len))]
        ),
        Shown::Invoked => invoked(v),
        Shown::Changed(what) => format!("{} {what}", name.unwrap_or_default()),
        Shown::Kv => kv(v["entries"].as_array().map_or(&[][..], Vec::as_slice)),
    }
}

/// The Sparkplug nodes (`GET /api/v1/sparkplug/nodes`) as a table: one row per node and
/// device.
pub(crate) fn sparkplug_nodes(v: &Value) -> String {
    let nodes = v["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    if nodes.is_empty() {
        return "no Sparkplug node has been seen since the edge started".into();
    }
    let mut t = table(&[
        "group/node/device",
        "online",
        "bdSeq",
        "seq",
        "metrics",
        "messages",
        "seq gaps",
        "rebirths",
        "last message",
    ]);
    let when = |v: &Value| {
        v.as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
    };
    let yes_no = |v: &Value| if v == true { "yes" } else { "no" };
    for n in nodes {
        let name = format!(
            "{}/{}",
            n["group"].as_str().unwrap_or_default(),
            n["node"].as_str().unwrap_or_default()
        );
        t.add_row(vec![
            name.clone(),
            yes_no(&n["online"]).into(),
            n["bd_seq"].as_u64().map_or("-".into(), |b| b.to_string()),
            n["seq"].as_u64().map_or("-".into(), |b| b.to_string()),
            n["metrics"].as_array().map_or(0, Vec::len).to_string(),
            count(n["messages"].as_u64().unwrap_or(0)),
            count(n["seq_gaps"].as_u64().unwrap_or(0)),
            count(n["rebirths_requested"].as_u64().unwrap_or(0)),
            when(&n["last_message_ms"]),
        ]);
        for d in n["devices"].as_array().map_or(&[][..], Vec::as_slice) {
            t.add_row(vec![
                format!("{name}/{}", d["device"].as_str().unwrap_or_default()),
                yes_no(&d["online"]).into(),
                String::new(),
                String::new(),
                d["metrics"].as_array().map_or(0, Vec::len).to_string(),
                String::new(),
                String::new(),
                String::new(),
                when(&d["last_message_ms"]),
            ]);
        }
    }
    right(&mut t, &[2, 3, 4, 5, 6, 7]);
    t.to_string()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.iter().map(Cell::new));
    t
}

fn right(t: &mut Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// 1234567 as "1,234,567".
pub(crate) fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as "0.4 s", "12 s", "3 min", "2.5 h".
fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn time(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "—".into(),
            |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        )
}

fn triggers(f: &Value) -> String {
    let mut t: Vec<String> = f["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    if let Some(s) = f["schedule"].as_str() {
        t.push(format!("cron {s}"));
    }
    if t.is_empty() {
        "manual only".into()
    } else {
        t.join("\n")
    }
}

fn lag(f: &Value) -> String {
    match (f["lag"]["events"].as_u64(), f["lag"]["seconds"].as_f64()) {
        (Some(0), _) => "0".into(),
        (Some(e), Some(s)) => format!("{} ({})", count(e), seconds(s)),
        _ => "—".into(),
    }
}

fn replay_cell(f: &Value) -> String {
    let r = &f["replay"];
    let (Some(state), Some(done)) = (r["state"].as_str(), r["events_done"].as_u64()) else {
        return "—".into();
    };
    match (state, r["events_total"].as_u64()) {
        ("counting", _) => "counting…".into(),
        ("running", Some(t)) if t > 0 => {
            format!("{}% ({}/{})", done * 100 / t, count(done), count(t))
        }
        (s, _) => format!("{s} ({})", count(done)),
    }
}

fn list(functions: &[Value]) -> String {
    if functions.is_empty() {
        return "no functions deployed (millrace-edge fn deploy NAME MODULE --topic FILTER)".into();
    }
    let mut t = table(&[
        "NAME",
        "VERSION",
        "STATE",
        "TRIGGERS",
        "EVENTS",
        "INVOCATIONS",
        "FAILURES",
        "LAG (EVENTS)",
        "SKIPPED",
        "REPLAY",
    ]);
    for f in functions {
        let s = &f["stats"];
        let state = if f["enabled"] == false {
            "disabled".to_owned()
        } else if s["paused_until_ms"].is_i64() {
            "paused".to_owned()
        } else {
            "enabled".to_owned()
        };
        t.add_row(vec![
            f["name"].as_str().unwrap_or_default().to_owned(),
            f["version"].to_string(),
            state,
            triggers(f),
            count(s["events"].as_u64().unwrap_or(0)),
            count(s["invocations"].as_u64().unwrap_or(0)),
            count(s["failures"].as_u64().unwrap_or(0)),
            lag(f),
            count(s["skipped"].as_u64().unwrap_or(0)),
            replay_cell(f),
        ]);
    }
    right(&mut t, &[1, 4, 5, 6, 7, 8]);
    t.to_string()
}

fn show(f: &Value) -> String {
    let s = &f["stats"];
    let mut t = table(&["", ""]);
    let rows: Vec<(&str, String)> = vec![
        ("name", f["name"].as_str().unwrap_or_default().to_owned()),
        ("version", f["version"].to_string()),
        ("enabled", f["enabled"].to_string()),
        (
            "description",
            f["description"].as_str().unwrap_or_default().to_owned(),
        ),
        ("triggers", triggers(f)),
        ("timeout", format!("{} ms", f["timeout_ms"])),
        ("memory", format!("{} MiB", f["memory_mib"])),
        (
            "concurrency / queue",
            format!("{} / {}", f["concurrency"], f["queue"]),
        ),
        ("events handled", count(s["events"].as_u64().unwrap_or(0))),
        ("invocations", count(s["invocations"].as_u64().unwrap_or(0))),
        ("failures", count(s["failures"].as_u64().unwrap_or(0))),
        ("lag (events)", lag(f)),
        ("replay", replay_cell(f)),
        (
            "skipped (past retention)",
            count(s["skipped"].as_u64().unwrap_or(0)),
        ),
        (
            "dropped (scheduled)",
            count(s["dropped"].as_u64().unwrap_or(0)),
        ),
        ("pauses", count(s["pauses"].as_u64().unwrap_or(0))),
        ("paused until", time(&s["paused_until_ms"])),
        ("next scheduled run", time(&f["next_run_ms"])),
        (
            "module",
            format!(
                "{} bytes, sha256 {}",
                f["module_bytes"],
                f["sha256"].as_str().unwrap_or_default()
            ),
        ),
        ("deployed", time(&f["updated_ms"])),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    t.to_string()
}

fn outcome_line(r: &Value) -> String {
    match r["error"].as_str() {
        Some(e) => e.to_owned(),
        None => r["logs"]
            .as_array()
            .and_then(|l| l.first())
            .and_then(|l| l["message"].as_str())
            .unwrap_or_default()
            .to_owned(),
    }
}

fn logs(records: &[Value]) -> String {
    if records.is_empty() {
        return "no invocations recorded".into();
    }
    let mut t = table(&[
        "STARTED (UTC)",
        "FUNCTION",
        "V",
        "TRIGGER",
        "DEVICE",
        "OUTCOME",
        "DURATION",
        "ERROR OR FIRST LOG LINE",
    ]);
    for r in records {
        let mut line = outcome_line(r);
        if line.chars().count() > 60 {
            line = line.chars().take(59).collect::<String>() + "…";
        }
        t.add_row(vec![
            time(&r["started_ms"]),
            r["function"].as_str().unwrap_or_default().to_owned(),
            r["version"].to_string(),
            r["trigger"].as_str().unwrap_or_default().to_owned(),
            r["device"].as_str().unwrap_or("").to_owned(),
            r["outcome"].as_str().unwrap_or_default().to_owned(),
            format!("{} µs", count(r["duration_us"].as_u64().unwrap_or(0))),
            line,
        ]);
    }
    right(&mut t, &[2, 6]);
    t.to_string()
}

fn invoked(r: &Value) -> String {
    let a = &r["actions"];
    let mut out = format!(
        "{} {}: {} in {} µs",
        r["function"].as_str().unwrap_or_default(),
        r["version"],
        r["outcome"].as_str().unwrap_or_default(),
        count(r["duration_us"].as_u64().unwrap_or(0)),
    );
    if let Some(e) = r["error"].as_str() {
        out += &format!("\nerror: {e}");
    }
    out += &format!(
        "\nactions: {} published, {} points, {} alerts, {} key-value writes",
        a["published"], a["points"], a["alerts"], a["kv_writes"]
    );
    for l in r["logs"].as_array().into_iter().flatten() {
        out += &format!(
            "\n[{}] {}",
            l["level"].as_str().unwrap_or_default(),
            l["message"].as_str().unwrap_or_default()
        );
    }
    out
}

fn kv(entries: &[Value]) -> String {
    if entries.is_empty() {
        return "no keys".into();
    }
    let mut t = table(&["KEY", "VALUE"]);
    for e in entries {
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => format!("base64:{}", e["value_base64"].as_str().unwrap_or_default()),
        };
        t.add_row(vec![
            e["key"].as_str().unwrap_or_default().to_owned(),
            value,
        ]);
    }
    t.to_string()
}

/// What `fn replay` was asked.
pub(crate) struct ReplayArgs {
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) cancel: bool,
    pub(crate) detach: bool,
    pub(crate) json: bool,
}

/// Sends a request to the edge's API (with the API key, if any); its JSON answer (`None` for
/// an empty one), or an error saying what the edge answered.
pub(crate) async fn call(
    req: reqwest::RequestBuilder,
    api_key: Option<&str>,
    url: &str,
) -> anyhow::Result<Option<Value>> {
    let req = match api_key {
        Some(k) => req.bearer_auth(k),
        None => req,
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the edge at {url} (is it running? --url)"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let json: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        let msg = json
            .as_ref()
            .and_then(|j| j["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        bail!("{status}: {msg}");
    }
    Ok(json)
}

/// `fn replay`: starts (or cancels) a replay and follows it with a progress bar until it ends;
/// Ctrl-C cancels it.
pub(crate) async fn replay(
    http: &reqwest::Client,
    base: &str,
    (edge, api_key): (&str, Option<&str>),
    name: &str,
    a: ReplayArgs,
) -> anyhow::Result<()> {
    let call = |req| async move {
        Ok::<_, anyhow::Error>(call(req, api_key, edge).await?.unwrap_or(Value::Null))
    };
    let url = format!("{base}/functions/{name}/replay");
    if a.cancel {
        let v = call(http.delete(&url)).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{name}: replay cancelled after {} events",
                count(v["events_done"].as_u64().unwrap_or(0))
            );
        }
        return Ok(());
    }
    let mut q = vec![("from", a.from.unwrap_or_default())];
    q.extend(a.to.map(|t| ("to", t)));
    let started = call(http.post(&url).query(&q)).await?;
    if a.detach {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("{name}: replay started (follow it with `millrace-edge fn list`)");
        }
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {human_pos}/{human_len} events ({per_sec}, {eta} left)",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{name}: counting"));
    let info_url = format!("{base}/functions/{name}");
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let status = loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                let v = call(http.delete(&url)).await?;
                bar.abandon_with_message(format!("{name}: cancelled"));
                break v;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let r = call(http.get(&info_url)).await?["replay"].clone();
        if let Some(t) = r["events_total"].as_u64() {
            bar.set_length(t);
            bar.set_message(format!("{name}: replaying"));
        }
        bar.set_position(r["events_done"].as_u64().unwrap_or(0));
        if !matches!(r["state"].as_str(), Some("counting" | "running")) {
            bar.finish_with_message(format!("{name}: {}", r["state"].as_str().unwrap_or("?")));
            break r;
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else if let Some(e) = status["error"].as_str() {
        bail!("the replay failed: {e}");
    } else {
        println!(
            "{name}: replay {} — {} of {} events",
            status["state"].as_str().unwrap_or("?"),
            count(status["events_done"].as_u64().unwrap_or(0)),
            count(status["events_total"].as_u64().unwrap_or(0)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_lag_and_counts_for_people() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(100), "100");
        let v = serde_json::json!({ "functions": [{
            "name": "threshold-alert", "version": 2, "enabled": true,
            "topics": ["factory/+/+/+/telemetry"], "schedule": null,
            "stats": { "events": 1500000, "invocations": 1500, "failures": 3, "skipped": 0, "paused_until_ms": null },
            "lag": { "events": 12000, "seconds": 1.5 },
        }]});
        let out = render(Shown::List, None, &v);
        for needle in [
            "threshold-alert",
            "factory/+/+/+/telemetry",
            "1,500,000",
            "12,000 (1.5 s)",
            "enabled",
        ] {
            assert!(out.contains(needle), "{needle} in\n{out}");
        }
        assert!(
            render(Shown::List, None, &serde_json::json!({ "functions": [] }))
                .contains("no functions")
        );
    }
}
