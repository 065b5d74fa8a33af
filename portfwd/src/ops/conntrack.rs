//! `portfwd conntrack`: the TC path's flows, with the mapping each belongs
//! to, and removing the flows of some mappings (after a container was
//! replaced, its clients' UDP flows would otherwise go on to the old one
//! until they idle out).

use std::{collections::HashMap, path::Path};

use anyhow::Result;
use portfwd_common::ServiceKey;

use crate::{
    datapath::{self, Flow, PinnedMaps},
    host,
    model::Mapping,
};

/// Which flows: those of mappings on a host port, or of a name.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlowFilter {
    pub(crate) port: Option<u16>,
    pub(crate) name: Option<String>,
}

impl FlowFilter {
    fn accepts(&self, mapping: &Mapping) -> bool {
        self.port.is_none_or(|port| mapping.host.port() == port)
            && self.name.as_ref().is_none_or(|name| &mapping.name == name)
    }
}

/// The live flows the filter selects, each with its mapping's name (None:
/// a flow whose mapping was removed, which the programs end at its next
/// packet).
pub(crate) fn flows(pin_dir: &Path, filter: &FlowFilter) -> Result<Vec<(Flow, Option<String>)>> {
    let mappings = mappings_by_key(pin_dir)?;
    Ok(datapath::flows(pin_dir)?
        .into_iter()
        .filter_map(|flow| match mappings.get(&flow.service) {
            Some(m) if filter.accepts(m) => {
                let name = Some(m.name.clone());
                Some((flow, name))
            }
            Some(_) => None,
            None if filter.port.is_none() && filter.name.is_none() => Some((flow, None)),
            None => None,
        })
        .collect())
}

/// Ends the flows the filter selects (without a filter: every flow, those
/// of removed mappings included); the number of flows ended.
pub(crate) fn flush_flows(pin_dir: &Path, filter: &FlowFilter) -> Result<usize> {
    host::require_capabilities("conntrack flush", host::CHANGE)?;
    let mappings = mappings_by_key(pin_dir)?;
    let everything = filter.port.is_none() && filter.name.is_none();
    datapath::forget_flows(pin_dir, |service| match mappings.get(service) {
        Some(m) => filter.accepts(m),
        None => everything,
    })
}

fn mappings_by_key(pin_dir: &Path) -> Result<HashMap<ServiceKey, Mapping>> {
    Ok(PinnedMaps::open_unlocked(pin_dir)?
        .mappings()?
        .into_iter()
        .map(|m| (m.key(), m))
        .collect())
}
