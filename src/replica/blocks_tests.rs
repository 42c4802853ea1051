//! Tests of the block-level resync between two targets, on simulated trees: what is sent, and
//! that applying it (as a target applies a staged resync) makes the behind tree the source's.

use super::*;
use crate::format::ids::IdSnapshot;
use crate::format::ops::{NodeKind, Op, SetAttr};
use crate::replica::apply::{Applied, Applier};
use crate::sim::tree::SimTree;

const SET: [u8; 16] = *b"blocks-test-set!";
const B: usize = DIGEST_BLOCK as usize;

fn create(a: &mut Applier<SimTree>, parent: u64, name: &str, id: u64, kind: NodeKind) {
    let target = if kind == NodeKind::Symlink { b"elsewhere".to_vec() } else { Vec::new() };
    let op = Op::Create {
        parent: FileId(parent),
        name: name.into(),
        new_id: FileId(id),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target,
    };
    assert_eq!(a.apply_op(&op).unwrap(), Applied::Done, "{op:?}");
}

fn write(a: &mut Applier<SimTree>, id: u64, offset: usize, data: &[u8]) {
    a.apply_write(FileId(id), offset as u64, data).unwrap();
}

/// The tree both targets shared once: a directory with a 5-block file, a 1-block file, a symlink.
fn shared() -> Applier<SimTree> {
    let mut a = Applier::new(SimTree::new(), SET, IdSnapshot::default());
    create(&mut a, 1, "d", 2, NodeKind::Dir);
    create(&mut a, 2, "big", 3, NodeKind::File);
    write(&mut a, 3, 0, &vec![7u8; 4 * B + 100]);
    create(&mut a, 1, "small", 4, NodeKind::File);
    write(&mut a, 4, 0, &vec![1u8; B]);
    create(&mut a, 1, "link", 5, NodeKind::Symlink);
    a
}

fn frames_of(f: impl FnOnce(Sink<'_>) -> Result<(), String>) -> Vec<Frame> {
    let mut out = Vec::new();
    f(&mut |fr| {
        out.push(fr);
        Ok(())
    })
    .unwrap();
    out
}

fn digests_of(tree: &SimTree) -> PeerDigests {
    let mut peer = PeerDigests::default();
    for f in frames_of(|s| send_digests(tree, &SET, s).map(drop)) {
        let Frame::Control(m) = f else { panic!("a digest stream holds control messages only") };
        peer.take(m).unwrap();
    }
    assert!(peer.complete());
    peer
}

/// Applies a resync stream as `TargetCore::apply_staged` does (entries, data, nodes, then the
/// stash emptied).
fn apply(b: &mut Applier<SimTree>, frames: Vec<Frame>) {
    let mut parts = Vec::new();
    for f in frames {
        match f {
            Frame::Control(ControlMsg::ResyncEntries { dir, entries, last }) => {
                parts.extend(entries);
                if last {
                    b.apply_entries(FileId(dir), &std::mem::take(&mut parts)).unwrap();
                }
            }
            Frame::Control(ControlMsg::ResyncNode { node }) => drop(b.apply_node(&node).unwrap()),
            Frame::Data { file, offset, data } => drop(b.apply_write(FileId(file), offset, &data).unwrap()),
            Frame::Control(ControlMsg::ResyncBegin { .. } | ControlMsg::ResyncEnd { .. }) => {}
            other => panic!("unexpected {other:?} in a resync"),
        }
    }
    b.finish_resync().unwrap();
}

fn resync(src: &Applier<SimTree>, dst: &mut Applier<SimTree>) -> BlockStats {
    let theirs = digests_of(dst.tree());
    let mut stats = BlockStats::default();
    let frames = frames_of(|s| {
        stats = send_block_resync(src.tree(), &SET, &theirs, 9, 100, s)?;
        Ok(())
    });
    let (first, last) = (frames.first().cloned(), frames.last().cloned());
    assert_eq!(first, Some(Frame::Control(ControlMsg::ResyncBegin { plan: 9, resume_lsn: 100, full: true })));
    assert_eq!(last, Some(Frame::Control(ControlMsg::ResyncEnd { plan: 9 })));
    apply(dst, frames);
    stats
}

#[test]
fn only_the_blocks_that_differ_are_sent_and_the_trees_end_equal() {
    let mut behind = shared();
    behind.tree().sync_all().unwrap();
    let mut ahead = Applier::new(behind.tree().fork(), SET, behind.snapshot());
    // The advanced target got more: one block of big changed, small grew by a block and a
    // half, a new file under a renamed directory, the symlink removed, an xattr.
    write(&mut ahead, 3, 2 * B + 5, b"changed");
    write(&mut ahead, 4, B, &vec![2u8; B + B / 2]);
    ahead
        .apply_op(&Op::Rename {
            parent: FileId(1),
            name: b"d".to_vec(),
            new_parent: FileId(1),
            new_name: b"e".to_vec(),
            id: FileId(2),
            replaced: FileId(0),
            flags: 0,
        })
        .unwrap();
    create(&mut ahead, 2, "new", 6, NodeKind::File);
    write(&mut ahead, 6, 0, b"fresh");
    ahead.apply_op(&Op::Unlink { parent: FileId(1), name: b"link".to_vec(), id: FileId(5), dir: false }).unwrap();
    ahead.apply_op(&Op::SetXattr { id: FileId(4), name: b"user.k".to_vec(), value: b"v".to_vec(), flags: 0 }).unwrap();
    // The behind target has a change of its own the advanced one never had (a mixed
    // directory): its last block of big, cut short.
    behind
        .apply_op(&Op::SetAttr { id: FileId(3), attr: SetAttr { size: Some(4 * B as u64 + 10), ..Default::default() } })
        .unwrap();

    let stats = resync(&ahead, &mut behind);
    assert_eq!(behind.tree().listing(), ahead.tree().listing(), "the behind tree is the advanced one's");
    assert_eq!(stats.files, 3);
    assert_eq!(stats.blocks, 5 + 3 + 1, "every block of every file is compared");
    // big: block 2 (changed) and block 4 (cut at the behind target); small: blocks 1 and 2;
    // new: block 0.
    assert_eq!(stats.blocks_sent, 5, "{stats:?}");
    assert_eq!(stats.data_bytes, (B + 100) as u64 + (B + B / 2) as u64 + 5);
    let xattrs = behind.tree().get_xattr(&lookup(behind.tree(), &[b"small"]), b"user.k").unwrap();
    assert_eq!(xattrs, b"v");

    // Level now: a second resync sends no data, and changes nothing.
    let before = behind.tree().listing();
    let again = resync(&ahead, &mut behind);
    assert_eq!(again.blocks_sent, 0);
    assert_eq!(again.data_bytes, 0);
    assert_eq!(behind.tree().listing(), before);
}

#[test]
fn an_empty_behind_target_gets_everything() {
    let ahead = shared();
    let mut behind = Applier::new(SimTree::new(), SET, IdSnapshot::default());
    let stats = resync(&ahead, &mut behind);
    assert_eq!(behind.tree().listing(), ahead.tree().listing());
    assert_eq!(stats.blocks_sent, stats.blocks);
}

fn lookup(tree: &SimTree, path: &[&[u8]]) -> crate::sim::tree::SimNode {
    let mut n = tree.root().unwrap();
    for name in path {
        n = tree.lookup(&n, name).unwrap();
    }
    n
}

#[test]
fn a_digest_stream_out_of_order_or_miscounted_is_refused() {
    let msg = |file, first_block, n: usize| ControlMsg::FileDigests { file, first_block, digests: vec![0; n] };
    let mut p = PeerDigests::default();
    assert!(p.take(msg(3, 0, 15)).unwrap_err().contains("not whole digests"));
    let mut p = PeerDigests::default();
    p.take(msg(3, 0, 32)).unwrap();
    assert!(p.take(msg(3, 5, 16)).unwrap_err().contains("from block 5, after 2"));
    let mut p = PeerDigests::default();
    p.take(msg(3, 0, 32)).unwrap();
    assert!(p.take(ControlMsg::DigestEnd { files: 1, blocks: 3 }).unwrap_err().contains("3 blocks"));
    let mut p = PeerDigests::default();
    p.take(msg(3, 0, 32)).unwrap();
    assert!(p.take(ControlMsg::DigestEnd { files: 1, blocks: 2 }).unwrap());
    assert!(p.take(msg(4, 0, 16)).unwrap_err().contains("after DigestEnd"));
    assert!(PeerDigests::default().take(ControlMsg::StatusRequest).unwrap_err().contains("expected digests"));
    // A source refuses to send from an incomplete stream.
    let err = send_block_resync(&SimTree::new(), &SET, &PeerDigests::default(), 1, 1, &mut |_| Ok(())).unwrap_err();
    assert!(err.contains("did not end"), "{err}");
}

#[test]
fn the_digest_of_a_block_depends_on_its_length_and_bytes() {
    assert_ne!(digest(b"abc"), digest(b"abc\0"));
    assert_ne!(digest(b"abc"), digest(b"abd"));
    assert_eq!(digest(b"abc"), digest(b"abc"));
}
