//! Tests of the applier.
