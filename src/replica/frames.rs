//! A target's handling of its primary's frames, apart from any transport (tokio in
//! `net::target`, a local call for `--target DIR`, the simulated network).

use super::staged::StagedItem;
use super::target::{TargetCore, TargetError};
use crate::io::{Storage, Tree};
use crate::journal::Settled;
use crate::proto::wire::control::ControlMsg;
use crate::types::Lsn;

/// What a target does with one frame from its primary, whatever carries it (tokio in
/// `net::target`, a local call for `--target DIR`, the simulated network): the replies to
/// send back. An error closes the connection; nothing of the frame was kept.
pub struct FrameHandler {
    /// A directory's entries come in parts; no other directory's may begin meanwhile.
    entries_dir: Option<u64>,
    /// Replies that go out before the one `control` returns (a long `DirtyMap`).
    pending: Vec<ControlMsg>,
}

impl Default for FrameHandler {
    fn default() -> Self {
        FrameHandler::new()
    }
}

impl FrameHandler {
    pub fn new() -> FrameHandler {
        FrameHandler { entries_dir: None, pending: Vec::new() }
    }

    pub fn handle<S: Storage, T: Tree>(
        &mut self,
        core: &TargetCore<S, T>,
        frame: crate::proto::wire::Frame,
    ) -> Result<Vec<crate::proto::wire::Frame>, String> {
        use crate::proto::wire::Frame;
        let e = |e: TargetError| e.to_string();
        match frame {
            Frame::Records(body) => Ok(vec![Frame::Ack(core.receive(&body).map_err(e)?)]),
            Frame::Heartbeat => Ok(vec![Frame::Heartbeat]),
            Frame::Ack(_) => Err("a primary sent an ack".into()),
            Frame::Data { file, offset, data } => {
                core.resync_item(&StagedItem::Data { file, offset, data }).map_err(e)?;
                Ok(Vec::new())
            }
            Frame::Control(msg) => {
                let last = self.control(core, msg)?;
                Ok(self.pending.drain(..).chain(last).map(Frame::Control).collect())
            }
        }
    }

    fn control<S: Storage, T: Tree>(
        &mut self,
        core: &TargetCore<S, T>,
        msg: ControlMsg,
    ) -> Result<Option<ControlMsg>, String> {
        let e = |e: TargetError| e.to_string();
        match msg {
            ControlMsg::Settled { settled_below, records_below } => {
                core.settled(Settled { settled_below: Lsn(settled_below), records_below: Lsn(records_below) });
                Ok(None)
            }
            ControlMsg::ResyncBegin { plan, resume_lsn, full } => {
                tracing::info!("resync {plan} begins (full: {full}); the log continues at {resume_lsn} after it");
                core.resync_begin(plan, resume_lsn).map_err(e)?;
                Ok(None)
            }
            ControlMsg::ResyncEntries { dir, entries, last } => {
                if let Some(d) = self.entries_dir.filter(|d| *d != dir) {
                    return Err(format!("entries of directory {dir} began before those of {d} ended"));
                }
                self.entries_dir = if last { None } else { Some(dir) };
                core.resync_item(&StagedItem::Entries { dir, entries, last }).map_err(e)?;
                Ok(None)
            }
            ControlMsg::ResyncNode { node } => {
                core.resync_item(&StagedItem::Node(node)).map_err(e)?;
                Ok(None)
            }
            ControlMsg::ResyncRead { plan, read_end_lsn } => {
                core.resync_read(plan, read_end_lsn).map_err(e)?;
                Ok(None)
            }
            ControlMsg::ResyncEnd { plan } => {
                core.resync_end(plan).map_err(e)?;
                Ok(Some(ControlMsg::ResyncDone { plan }))
            }
            ControlMsg::StatusRequest => Ok(Some(core.status_msg())),
            ControlMsg::Watermark { all_acked_lsn } => {
                core.watermark(all_acked_lsn);
                Ok(Some(core.log_info(true)))
            }
            ControlMsg::ForkPoint { fork_lsn } => {
                let mut msgs = core.dirty_since(fork_lsn).map_err(e)?;
                // All but the last go out now; the caller sends the returned one last.
                let last = msgs.pop();
                self.pending.extend(msgs);
                Ok(last)
            }
            ControlMsg::Bye { reason } => Err(format!("the primary said goodbye: {reason}")),
            other => Err(format!("unexpected control message from a primary: {other:?}")),
        }
    }
}
