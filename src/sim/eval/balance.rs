//! (being written)

use super::{EvalError, EvalOpts, Report};

pub fn run(_opts: &EvalOpts) -> Result<Report, EvalError> {
    Err(EvalError::Run("not written yet".into()))
}
