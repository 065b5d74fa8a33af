//! `portfwd explain`: the answer of `ops::explain` as one screen, or JSON.

use std::{io::Write, path::Path};

use anyhow::{Result, bail};

use crate::ops::{self, Explanation, MatchKind, Matched, Question};

pub(crate) fn explain(pin_dir: &Path, target: &str, from: Option<&str>, json: bool) -> Result<()> {
    let question = Question::parse(target, from)?;
    let explanation = ops::explain(pin_dir, question)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &explanation)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &explanation)?;
    }
    out.flush()?;
    if !explanation.served {
        // Exit status 1, with the verdict on stderr as for any failure.
        bail!("{}/{} is not served", question.addr, question.protocol);
    }
    Ok(())
}

fn write_text(out: &mut impl Write, e: &Explanation) -> Result<()> {
    let q = &e.question;
    let client = q
        .from
        .map(|from| format!(" for a client at {from}"))
        .unwrap_or_default();
    let verdict = if e.served { "served" } else { "NOT served" };
    writeln!(out, "{}/{}{client}: {verdict}", q.addr, q.protocol)?;
    if let Some(m) = &e.matched {
        write_mapping(out, e, m)?;
    }
    write_paths(out, e)?;
    for reason in &e.reasons {
        row(out, "note", reason.clone())?;
    }
    Ok(())
}

fn row(out: &mut dyn Write, label: &str, text: String) -> std::io::Result<()> {
    writeln!(out, "  {label:<10} {text}")
}

/// The matching mapping: how it matched, its container, list, counters and
/// live flows.
fn write_mapping(out: &mut impl Write, e: &Explanation, m: &Matched) -> Result<()> {
    let q = &e.question;
    let how = match m.how {
        MatchKind::Exact => "published on this address".to_owned(),
        MatchKind::Wildcard => format!(
            "the wildcard: serves every {} address of this host",
            if q.addr.is_ipv4() { "IPv4" } else { "IPv6" }
        ),
    };
    row(
        out,
        "mapping",
        format!(
            "{} {}/{} -> {} ({how})",
            m.name, m.host, q.protocol, m.container
        ),
    )?;
    let via = match &m.container_interface {
        Some(name) if m.container_interface_into_peer => {
            format!(
                "via {name} (reply program attached; into the container's namespace in one pass)"
            )
        }
        Some(name) if m.container_interface_attached => {
            format!("via {name} (reply program attached)")
        }
        Some(name) => format!("via {name} (NO reply program)"),
        None => "routed by the stack (no interface recorded)".to_owned(),
    };
    row(out, "container", format!("{} {via}", m.container))?;
    if let Some(allow) = &m.allow {
        row(out, "allow", format!("{allow} (others: {})", allow.refuse))?;
    }
    let c = &m.counters;
    row(
        out,
        "traffic",
        format!(
            "{} flow{}; in {} packets/{} bytes, out {} packets/{} bytes (TC path)",
            c.flows,
            if c.flows == 1 { "" } else { "s" },
            c.packets_in,
            c.bytes_in,
            c.packets_out,
            c.bytes_out
        ),
    )?;
    const SHOWN: usize = 10;
    for f in m.flows.iter().take(SHOWN) {
        row(
            out,
            "flow",
            format!(
                "{} -> {} -> {} (container sees {}; {}, idle {}s)",
                f.client,
                f.published,
                f.container,
                f.container_sees,
                f.state.as_str(),
                f.idle.as_secs()
            ),
        )?;
    }
    if m.flows.len() > SHOWN {
        row(
            out,
            "flow",
            format!(
                "... {} more (`portfwd conntrack list`)",
                m.flows.len() - SHOWN
            ),
        )?;
    }
    Ok(())
}

/// Which paths translate the port (host processes, external clients) and
/// who binds it.
fn write_paths(out: &mut impl Write, e: &Explanation) -> Result<()> {
    let port = e.question.addr.port();
    if e.up {
        let host_path = if e.host_path {
            "translated at connect/sendmsg (socket programs attached)"
        } else {
            "NOT translated (socket programs missing)"
        };
        row(out, "host", format!("processes on this host: {host_path}"))?;
        let external = if e.loopback {
            "never (a loopback address)".to_owned()
        } else if e.uplinks.is_empty() {
            "NOT translated (no uplink attached)".to_owned()
        } else {
            format!("translated on {}", e.uplinks.join(", "))
        };
        row(out, "external", format!("clients: {external}"))?;
    }
    let held = match (&e.port_held_by, e.port_holder_running) {
        (Some(owner), _) => format!("port {port} bound by {owner}"),
        (None, true) => format!("port {port} not bound by any process"),
        (None, false) => format!("port {port} not bound (the port holder is not running)"),
    };
    row(out, "port", held)?;
    Ok(())
}
