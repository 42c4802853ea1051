//! `ferryfs inspect`: the journal's superblock, segments and records, one line each.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use super::common;
use crate::format::ops::Op;
use crate::format::record::{self, Kind};
use crate::format::segment::{SEGMENT_HEADER_SIZE, SegmentHeader, segment_name};
use crate::io::{SegmentFile, Storage};
use crate::journal::reader::{self, EndKind};
use crate::os::storage::DirStorage;

#[derive(clap::Args, Debug)]
#[command(
    about = "Print a journal's superblock, segments and records, one line each",
    long_about = "Reads a journal directory without changing it and prints its superblock, every segment \
header, every record from the start of the log (the last checkpoint) to its end, and why the log ends \
there (clean end, torn last record, or corruption). With --json, one JSON object per line. Works on a \
mounted journal too (it reads a consistent prefix)."
)]
pub struct InspectArgs {
    /// The journal directory.
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print at most this many records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(a: InspectArgs) -> Result<()> {
    let journal = common::existing_dir("--journal", &a.journal)?;
    let storage = DirStorage::new(&journal);
    let sb = common::superblock(&storage)?;
    let out = |text: String, j: serde_json::Value| {
        if a.json {
            println!("{j}");
        } else {
            println!("{text}");
        }
    };
    out(
        format!(
            "superblock seq={} clean={} set={} epoch={} segments={}x{} start_lsn={} start=seg-seq {} offset {} next_file_id={} backing={}",
            sb.seq,
            sb.clean,
            hex(&sb.set_id),
            sb.epoch,
            sb.segment_count,
            sb.segment_size,
            sb.start_lsn.0,
            sb.start_seq,
            sb.start_offset,
            sb.next_file_id.0,
            String::from_utf8_lossy(&sb.backing_path)
        ),
        json!({"type": "superblock", "seq": sb.seq, "clean": sb.clean, "set_id": hex(&sb.set_id), "epoch": sb.epoch,
               "segment_count": sb.segment_count, "segment_size": sb.segment_size, "start_lsn": sb.start_lsn.0,
               "start_seq": sb.start_seq, "start_offset": sb.start_offset, "next_file_id": sb.next_file_id.0,
               "backing": String::from_utf8_lossy(&sb.backing_path)}),
    );
    let existing = storage.segment_count()?;
    for i in 0..existing {
        let name = segment_name(i);
        match storage.open_segment(i, sb.segment_size, false) {
            Ok(seg) => {
                let mut hb = [0u8; SEGMENT_HEADER_SIZE];
                seg.read(0, &mut hb);
                match SegmentHeader::decode(&hb) {
                    Ok(h) => out(
                        format!("segment {name} seq={} first_lsn={}", h.seq, h.first_lsn.0),
                        json!({"type": "segment", "file": name, "seq": h.seq, "first_lsn": h.first_lsn.0}),
                    ),
                    Err(e) => out(
                        format!("segment {name} header: {e}"),
                        json!({"type": "segment", "file": name, "error": e.to_string()}),
                    ),
                }
            }
            Err(e) => {
                out(format!("segment {name}: {e}"), json!({"type": "segment", "file": name, "error": e.to_string()}))
            }
        }
    }
    let mut shown = 0u64;
    let end = reader::scan(&storage, &sb, |r| {
        if a.limit.is_some_and(|l| shown >= l) {
            return false;
        }
        shown += 1;
        let h = &r.header;
        let detail = match h.kind {
            Kind::Write => match record::decode_write(r.payload) {
                Ok((f, off, d)) => format!("file={} offset={} len={}", f.0, off, d.len()),
                Err(e) => format!("bad payload: {e}"),
            },
            Kind::Op => match Op::decode(r.payload) {
                Ok(op) => op.describe(),
                Err(e) => format!("bad payload: {e}"),
            },
            Kind::Bind => match record::decode_bind(r.payload) {
                Ok((id, hd)) => format!("file={} handle={}", id.0, hex(&hd.0)),
                Err(e) => format!("bad payload: {e}"),
            },
            Kind::Abort => format!("errno={}", record::decode_abort(r.payload).unwrap_or(-1)),
            _ => String::new(),
        };
        out(
            format!(
                "record lsn={} tx={} kind={} len={} at {} +{} {detail}",
                h.lsn.0,
                h.txid.0,
                h.kind.name(),
                h.payload_len,
                segment_name((r.pos.seq % sb.segment_count as u64) as u32),
                r.pos.offset
            ),
            json!({"type": "record", "lsn": h.lsn.0, "tx": h.txid.0, "kind": h.kind.name(), "payload_len": h.payload_len,
                   "segment": segment_name((r.pos.seq % sb.segment_count as u64) as u32), "offset": r.pos.offset, "detail": detail}),
        );
        true
    })?;
    let (kind, why) = match &end.kind {
        EndKind::Clean => ("clean", end.found.clone()),
        EndKind::Torn(w) => ("torn", w.clone()),
        EndKind::Corrupt(w) => ("corrupt", w.clone()),
    };
    let file = segment_name((end.pos.seq % sb.segment_count as u64) as u32);
    out(
        format!("end {kind} at {file} +{} next_lsn={} ({why}); {shown} records", end.pos.offset, end.next_lsn.0),
        json!({"type": "end", "kind": kind, "segment": file, "offset": end.pos.offset, "next_lsn": end.next_lsn.0,
               "reason": why, "records": shown}),
    );
    Ok(())
}
