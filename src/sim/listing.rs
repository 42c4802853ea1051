//! Simulated trees as the simulations' checkers compare them: a `Listing` (`SimTree::listing`),
//! the part of it compared (`visible`), and what differs between two (`listing_diff`).

use std::collections::BTreeMap;

use crate::format::ops::NodeKind;

/// A tree as `path → (kind, content or symlink target)`.
pub type Listing = BTreeMap<String, (NodeKind, Vec<u8>)>;

/// The tree as compared: a target's own stash (`/.ferryfs…`) excluded.
pub(crate) fn visible(mut l: Listing) -> Listing {
    l.retain(|k, _| !k.starts_with("/.ferryfs"));
    l
}

/// What differs between two listings, briefly: paths missing from `have`, differing (kinds,
/// lengths and the first differing byte) or extra in it.
pub(crate) fn listing_diff(want: &Listing, have: &Listing) -> String {
    let mut out = Vec::new();
    for (k, (kind, data)) in want {
        match have.get(k) {
            None => out.push(format!("{k}: missing")),
            Some((hk, hd)) if hk != kind || hd != data => {
                let at = data.iter().zip(hd).position(|(a, b)| a != b);
                out.push(format!(
                    "{k}: {kind:?} {} bytes vs {hk:?} {} bytes, first difference at {at:?}",
                    data.len(),
                    hd.len()
                ))
            }
            _ => {}
        }
    }
    out.extend(have.keys().filter(|k| !want.contains_key(*k)).map(|k| format!("{k}: extra")));
    out.join("; ")
}
