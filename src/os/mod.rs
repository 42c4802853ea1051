//! Real implementations of the seams in `io`: journal storage on a directory, and the
//! backing tree through O_PATH fds and `*at` calls. The only place besides `fuse/` with `unsafe`.

pub mod storage;
pub mod tree;
