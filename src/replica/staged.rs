//! A resync's staged items (the resync staging file holds them; a consistent set's staging
//! will too): their encoding, and how they are applied in order through the applier.

use super::apply::{Applied, Applier, ApplyError};
use super::target::TargetError;
use crate::io::Tree;
use crate::proto::wire::control::{ControlMsg, NodeDesc};
use crate::types::FileId;

/// A directory's entries waiting for the directory to exist.
type DeferredEntries = (FileId, Vec<(Vec<u8>, NodeDesc)>);

/// Applies staged items in their order, as a resync's staging holds them (and a consistent
/// set's will): a directory's entries once its last part is in, deferring a directory the
/// target has not made yet until its parent's entries make it; then the stash emptied and the
/// root's node applied again (emptying the stash changed its mtime).
#[derive(Default)]
pub(crate) struct StagedApply {
    parts: Vec<(Vec<u8>, NodeDesc)>,
    root_node: Option<NodeDesc>,
    deferred: Vec<DeferredEntries>,
}

impl StagedApply {
    pub(crate) fn item<T: Tree>(
        &mut self,
        a: &mut Applier<T>,
        item: StagedItem,
        note: impl Fn(Result<Applied, ApplyError>) -> Result<(), TargetError>,
    ) -> Result<(), TargetError> {
        let r = match item {
            StagedItem::Entries { dir, entries, last } => {
                self.parts.extend(entries);
                if !last {
                    return Ok(());
                }
                let list = std::mem::take(&mut self.parts);
                match a.apply_entries(FileId(dir), &list) {
                    // A directory the target has not made yet: its parent's entries, later in
                    // the resync, will make it (a directory moved under a newer one on the
                    // primary). Tried again once those are applied.
                    Ok(Applied::Skipped(_)) => {
                        self.deferred.push((FileId(dir), list));
                        Ok(Applied::Already)
                    }
                    r => r,
                }
            }
            other => {
                if !self.deferred.is_empty() {
                    retry_deferred(a, &mut self.deferred, &note)?;
                }
                match other {
                    StagedItem::Node(n) => {
                        if n.id == FileId::ROOT.0 {
                            self.root_node = Some(n.clone());
                        }
                        a.apply_node(&n)
                    }
                    StagedItem::Data { file, offset, data } => a.apply_write(FileId(file), offset, &data),
                    StagedItem::Entries { .. } => unreachable!("matched above"),
                }
            }
        };
        note(r)
    }

    pub(crate) fn finish<T: Tree>(
        mut self,
        a: &mut Applier<T>,
        note: impl Fn(Result<Applied, ApplyError>) -> Result<(), TargetError>,
    ) -> Result<(), TargetError> {
        retry_deferred(a, &mut self.deferred, &note)?;
        a.finish_resync()?;
        if let Some(n) = self.root_node {
            note(a.apply_node(&n))?;
        }
        Ok(())
    }
}

/// Applies the directories whose entries were deferred, as often as any of them makes
/// progress (each applied one may make another's directory exist).
fn retry_deferred<T: Tree>(
    a: &mut Applier<T>,
    deferred: &mut Vec<DeferredEntries>,
    note: impl Fn(Result<Applied, ApplyError>) -> Result<(), TargetError>,
) -> Result<(), TargetError> {
    loop {
        let before = deferred.len();
        let mut left = Vec::new();
        for (dir, list) in deferred.drain(..) {
            match a.apply_entries(dir, &list) {
                Ok(Applied::Skipped(_)) => left.push((dir, list)),
                r => note(r)?,
            }
        }
        *deferred = left;
        if deferred.is_empty() || deferred.len() == before {
            break;
        }
    }
    for (dir, _) in deferred.drain(..) {
        tracing::debug!("resync: directory {dir} is in no directory of the resync; skipped");
    }
    Ok(())
}

/// One staged resync item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StagedItem {
    /// One part of a directory's entries; the directory is reconciled once its `last` part is in.
    Entries {
        dir: u64,
        entries: Vec<(Vec<u8>, NodeDesc)>,
        last: bool,
    },
    Node(NodeDesc),
    Data {
        file: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

impl StagedItem {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TargetError> {
        let ctl =
            |m: ControlMsg| crate::proto::wire::control::encode(&m).map_err(|e| TargetError::Protocol(e.to_string()));
        Ok(match self {
            StagedItem::Entries { dir, entries, last } => {
                let mut v = vec![1u8];
                v.extend(ctl(ControlMsg::ResyncEntries { dir: *dir, entries: entries.clone(), last: *last })?);
                v
            }
            StagedItem::Node(n) => {
                let mut v = vec![2u8];
                v.extend(ctl(ControlMsg::ResyncNode { node: n.clone() })?);
                v
            }
            StagedItem::Data { file, offset, data } => {
                let mut v = Vec::with_capacity(17 + data.len());
                v.push(3u8);
                v.extend_from_slice(&file.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(data);
                v
            }
        })
    }

    pub(crate) fn decode(b: &[u8]) -> Result<StagedItem, TargetError> {
        let bad = || TargetError::Protocol("a staged resync item does not decode".into());
        let (tag, rest) = b.split_first().ok_or_else(bad)?;
        match tag {
            1 | 2 => match crate::proto::wire::control::decode(rest).map_err(|_| bad())? {
                ControlMsg::ResyncEntries { dir, entries, last } => Ok(StagedItem::Entries { dir, entries, last }),
                ControlMsg::ResyncNode { node } => Ok(StagedItem::Node(node)),
                _ => Err(bad()),
            },
            3 if rest.len() >= 16 => Ok(StagedItem::Data {
                file: u64::from_le_bytes(rest[..8].try_into().unwrap()),
                offset: u64::from_le_bytes(rest[8..16].try_into().unwrap()),
                data: rest[16..].to_vec(),
            }),
            _ => Err(bad()),
        }
    }
}
