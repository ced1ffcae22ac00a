//! The values of enumerated flags, each declared once here as a clap `ValueEnum` and converted
//! into the library's own type, so that the library needs no clap and no parsing of its own.
//! `--device` is not enumerable (`cuda:N`): it stays a string, parsed next to the backends
//! (`merge::Device`).

use clap::ValueEnum;

use crate::adapter::StrengthMode;
use crate::formats::Source;

/// `--from`: which reader takes the adapter (`formats::Source`).
// Variant doc comments would become clap help text; the flag's own help names them.
#[allow(missing_docs)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum From {
    Auto,
    Canonical,
    Peft,
    PeftLegacyConv,
    Lycoris,
    Kohya,
}

impl std::convert::From<From> for Source {
    fn from(f: From) -> Source {
        match f {
            From::Auto => Source::Auto,
            From::Canonical => Source::Canonical,
            From::Peft => Source::Peft,
            From::PeftLegacyConv => Source::PeftLegacyConv,
            From::Lycoris => Source::Lycoris,
            From::Kohya => Source::Kohya,
        }
    }
}

/// `--strength-mode`: how a strength other than 1 is applied (`adapter::StrengthMode`).
// As for `From`: the flag's help says what each mode does.
#[allow(missing_docs)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Mode {
    Linear,
    PerFactor,
    Geodesic,
}

impl std::convert::From<Mode> for StrengthMode {
    fn from(m: Mode) -> StrengthMode {
        match m {
            Mode::Linear => StrengthMode::Linear,
            Mode::PerFactor => StrengthMode::PerFactor,
            Mode::Geodesic => StrengthMode::Geodesic,
        }
    }
}
