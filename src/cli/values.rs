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

/// An adapter on the command line or in a batch file: `PATH[,strength=T][,mode=M][,from=F]`.
/// The options after the path override `--strength`, `--strength-mode` and `--from` for this
/// adapter alone. A string that names an existing file or folder as a whole is a path, commas
/// and all.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    /// The adapter's path or hub id.
    pub path: std::path::PathBuf,
    /// `strength=T`.
    pub strength: Option<f64>,
    /// `mode=linear|per-factor|geodesic`.
    pub mode: Option<Mode>,
    /// `from=auto|canonical|peft|…`.
    pub from: Option<From>,
}

impl AdapterSpec {
    /// Parse one `--adapter` value. Options are read from the right: trailing `,key=value`
    /// pieces with a known key (a piece holding a `/` belongs to the path, so folders whose
    /// names hold commas stay paths); the rest, whatever its bytes, is the path.
    pub fn parse(s: &std::ffi::OsStr) -> Result<AdapterSpec, String> {
        use std::os::unix::ffi::OsStrExt;
        let mut spec = AdapterSpec {
            path: s.into(),
            strength: None,
            mode: None,
            from: None,
        };
        if std::path::Path::new(s).exists() {
            return Ok(spec);
        }
        let bytes = s.as_bytes();
        let mut end = bytes.len();
        let mut seen: Vec<&[u8]> = Vec::new();
        while let Some(comma) = bytes[..end].iter().rposition(|&b| b == b',') {
            let piece = &bytes[comma + 1..end];
            let Some(eq) = piece.iter().position(|&b| b == b'=') else {
                break;
            };
            if piece.contains(&b'/') {
                break;
            }
            let (key, value) = (&piece[..eq], &piece[eq + 1..]);
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let value =
                std::str::from_utf8(value).map_err(|_| format!("{}: not text", text(piece)))?;
            if seen.contains(&key) {
                return Err(format!("{} given twice", text(key)));
            }
            seen.push(key);
            match key {
                b"strength" => {
                    let t: f64 = value
                        .parse()
                        .map_err(|_| format!("strength={value}: expected a number"))?;
                    if !t.is_finite() {
                        return Err(format!("strength={value}: expected a finite number"));
                    }
                    spec.strength = Some(t);
                }
                b"mode" => spec.mode = Some(Mode::from_str(value, false)?),
                b"from" => spec.from = Some(From::from_str(value, false)?),
                _ => {
                    return Err(format!(
                        "{}: unknown adapter option (strength, mode, from)",
                        text(piece)
                    ))
                }
            }
            end = comma;
        }
        if end == 0 {
            return Err("no path before the options".into());
        }
        spec.path = std::ffi::OsStr::from_bytes(&bytes[..end]).into();
        Ok(spec)
    }
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<AdapterSpec, String> {
        AdapterSpec::parse(s.as_ref())
    }
}

/// The clap parser of `AdapterSpec` values, on the raw argument (paths need not be UTF-8).
#[derive(Clone)]
pub struct AdapterSpecParser;

impl clap::builder::TypedValueParser for AdapterSpecParser {
    type Value = AdapterSpec;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<AdapterSpec, clap::Error> {
        AdapterSpec::parse(value).map_err(|m| {
            let name = arg.map(|a| a.to_string()).unwrap_or_default();
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for {name}: {m}\n"),
            )
            .with_cmd(cmd)
        })
    }
}
