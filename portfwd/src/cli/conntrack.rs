//! `portfwd conntrack list|flush`.

use std::{io::Write, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

use super::list::write_table;
use crate::{
    datapath::Flow,
    ops::{self, FlowFilter},
};

#[derive(Serialize)]
struct FlowJson<'a> {
    #[serde(flatten)]
    flow: &'a Flow,
    /// The mapping's name; null for a flow of a removed mapping.
    mapping: Option<&'a str>,
}

pub(crate) fn list(pin_dir: &Path, filter: &FlowFilter, json: bool) -> Result<()> {
    let flows = ops::flows(pin_dir, filter)?;
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<FlowJson> = flows
            .iter()
            .map(|(flow, mapping)| FlowJson {
                flow,
                mapping: mapping.as_deref(),
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<[String; 7]> = flows
        .iter()
        .map(|(f, mapping)| {
            [
                mapping.clone().unwrap_or_else(|| "(removed)".into()),
                f.protocol.to_string(),
                f.client.to_string(),
                f.published.to_string(),
                format!("{} (sees {})", f.container, f.container_sees),
                f.state.as_str().to_owned(),
                format!("{}s", f.idle.as_secs()),
            ]
        })
        .collect();
    let header = [
        "MAPPING",
        "PROTO",
        "CLIENT",
        "PUBLISHED",
        "CONTAINER",
        "STATE",
        "IDLE",
    ];
    write_table(&mut out, header, &rows).context("writing the table")?;
    if rows.is_empty() {
        writeln!(out, "(no tracked flows: the TC path has none live)")?;
    }
    Ok(())
}

pub(crate) fn flush(pin_dir: &Path, filter: &FlowFilter) -> Result<()> {
    let ended = ops::flush_flows(pin_dir, filter)?;
    println!("ended {ended} flow{}", if ended == 1 { "" } else { "s" });
    Ok(())
}
