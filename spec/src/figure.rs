//! The paper's figures as data: which runs a figure needs (each a config: a base, the scale's
//! settings and the run's own), what is evaluated, how the panels are drawn, and how the runs
//! are split over the tasks of a job array ([`crate::blackbox::Shard::indices`]). `configs/figures/*.toml` holds one figure each;
//! `eio sweep` runs them and `eio plot` draws them (eio-accelerated's `sweep` and `plot`).
//!
//! A figure file:
//! ```toml
//! title = "Fig. 3: EIO's hyper-parameters"
//! paper = "what the paper's figure shows"
//! evaluate = ["white-box", "black-box"]     # clean accuracy is always measured
//!
//! [scales.cpu]                              # at least one scale; `cpu` and `paper` by custom
//! base = "paper"                            # a preset name, or a config file (relative to this file)
//! set = ["model.width=0.5"]                 # applied to every run of this scale
//! note = "what is smaller than the paper"   # printed with every plot of this scale
//!
//! [[runs]]
//! id = "p2"                                 # its folder name
//! label = "p = 2"                           # its name in plots and tables
//! method = "eio"                            # eio | baseline | rival
//! set = ["eio.p=2"]
//!
//! [[panels]]
//! name = "p"
//! title = "paths per iteration p"
//! kind = "accuracy"                         # accuracy | curves | cost | spread
//! protocol = "black-box"                    # accuracy and spread panels
//! runs = ["p2"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Method, Preset};
use crate::rivals::RivalRun;

/// Errors of a figure definition, each naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum FigureError {
    #[error("cannot read figure file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {field}: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
    #[error("{origin}: run {run}: {source}")]
    Config {
        origin: String,
        run: String,
        #[source]
        source: Box<ConfigError>,
    },
}

/// What a figure's runs are judged by, besides clean accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evaluation {
    /// White-box PGD of the config's `[eval]` (all-or-nothing over restarts and losses).
    WhiteBox,
    /// The black-box transfer suite of the figure's `[blackbox]`, one suite for every run.
    BlackBox,
}

/// One way to run a figure: a base config and the settings every run of it gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// A preset name (`paper`, `official`, ...) or a config file relative to the figure file.
    pub base: String,
    /// `key=value` assignments applied to the base for every run of this scale.
    #[serde(default)]
    pub set: Vec<String>,
    /// `key=value` assignments applied to every rival run of this scale before the run's own
    /// (a rival's preset keeps its public code's schedule otherwise: e.g. its epochs).
    #[serde(default)]
    pub rival_set: Vec<String>,
    /// What this scale changes from the paper, stated with every plot.
    pub note: String,
}

/// How a run trains its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunMethod {
    /// An EIO RGN (Algorithm 1), then the path of draw `path` derived and fine-tuned (Sec. 3.4).
    Eio,
    /// A plain (ensemble of `members`) network trained on clean data, as long as EIO's
    /// pre-training plus main epochs.
    Baseline,
    /// A rival method trained with the settings of `preset` (`rivals::rival_config`).
    Rival,
}

/// One run of a figure: one model, trained and evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Its folder name (letters, digits, `.`, `_`, `-`), unique in the figure.
    pub id: String,
    /// Its name in plots and tables.
    pub label: String,
    pub method: RunMethod,
    /// `key=value` assignments applied last (the swept value).
    #[serde(default)]
    pub set: Vec<String>,
    /// The rival's preset (`method = "rival"` only).
    #[serde(default)]
    pub preset: Option<String>,
    /// Members of a baseline ensemble (`method = "baseline"`; default 1).
    #[serde(default)]
    pub members: Option<usize>,
    /// Which derived path (`method = "eio"`): draw `path` of the derivation stream; draw 0 is
    /// the path `eio run` derives. Default 0.
    #[serde(default)]
    pub path: u64,
    /// Judge only this member of the trained ensemble (Fig. 6 judges one member of each).
    #[serde(default)]
    pub member: Option<usize>,
}

/// What a panel draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PanelKind {
    /// Accuracy against the attack radius ε, a line per run (ε = 0 is clean accuracy).
    Accuracy,
    /// Per-epoch held-out (or test) accuracy through every training stage of each run.
    Curves,
    /// Training time per run, by phase (measured wall time of the training epochs).
    Cost,
    /// The runs side by side at each ε: the spread over runs that should agree (Fig. 8).
    Spread,
}

/// Which adversarial accuracy a panel shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PanelProtocol {
    BlackBox,
    WhiteBox,
}

impl PanelProtocol {
    /// The evaluation that measures it.
    pub fn evaluation(self) -> Evaluation {
        match self {
            PanelProtocol::BlackBox => Evaluation::BlackBox,
            PanelProtocol::WhiteBox => Evaluation::WhiteBox,
        }
    }
}

/// One plot of a figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    /// Its file stem (`<name>.svg`, `<name>.png`).
    pub name: String,
    pub title: String,
    pub kind: PanelKind,
    /// For `accuracy` and `spread` panels.
    #[serde(default)]
    pub protocol: Option<PanelProtocol>,
    /// The runs drawn, by id, in legend order.
    pub runs: Vec<String>,
}

/// A figure: its runs, evaluation, scales and panels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub title: String,
    /// What the paper's figure shows (its caption, in short).
    #[serde(default)]
    pub paper: String,
    #[serde(default)]
    pub evaluate: Vec<Evaluation>,
    pub scales: BTreeMap<String, Scale>,
    pub runs: Vec<RunSpec>,
    pub panels: Vec<Panel>,
}

/// The figures shipped in `configs/figures/`, by name.
pub const BUILTIN: [(&str, &str); 7] = [
    ("fig3", include_str!("../../configs/figures/fig3.toml")),
    ("fig4", include_str!("../../configs/figures/fig4.toml")),
    (
        "fig4-vgg16",
        include_str!("../../configs/figures/fig4-vgg16.toml"),
    ),
    ("fig5", include_str!("../../configs/figures/fig5.toml")),
    ("fig6", include_str!("../../configs/figures/fig6.toml")),
    ("fig7", include_str!("../../configs/figures/fig7.toml")),
    ("fig8", include_str!("../../configs/figures/fig8.toml")),
];

/// A figure with where it came from (a shipped name or a file, whose folder resolves relative
/// `base` files).
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub figure: Figure,
    /// `configs/figures/<name>.toml` or the file path, for messages.
    pub origin: String,
    /// The folder relative `base` files are read from; `None` for a shipped figure.
    pub folder: Option<PathBuf>,
}

impl Source {
    /// A shipped figure by name (`fig3`), or a figure file (a path that exists or ends in `.toml`).
    ///
    /// # Errors
    /// An unknown name, an unreadable file, or an invalid definition.
    pub fn open(name_or_path: &str) -> Result<Source, FigureError> {
        let path = FsPath::new(name_or_path);
        if path.exists() || name_or_path.ends_with(".toml") {
            let text = std::fs::read_to_string(path).map_err(|source| FigureError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let origin = path.display().to_string();
            let figure = Figure::from_toml(&text, &origin)?;
            let folder = path.parent().map(FsPath::to_path_buf).unwrap_or_default();
            return Ok(Source {
                figure,
                origin,
                folder: Some(folder),
            });
        }
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name_or_path)
            .ok_or_else(|| FigureError::Invalid {
                origin: "eio sweep".into(),
                field: "FIGURE".into(),
                message: format!(
                    "{name_or_path:?} is neither a figure file nor a shipped figure (one of {})",
                    BUILTIN.map(|(n, _)| n).join(", ")
                ),
            })?;
        let origin = format!("configs/figures/{name_or_path}.toml");
        Ok(Source {
            figure: Figure::from_toml(text, &origin)?,
            origin,
            folder: None,
        })
    }

    /// The figure's config at `scale` before any run's settings: the base, the scale's
    /// `set`, then `extra` (the command line's `--set`). The black-box suite and the
    /// evaluation of every run come from it.
    ///
    /// # Errors
    /// An unknown scale, or a base or assignment that does not load.
    pub fn scale_config(&self, scale: &str, extra: &[String]) -> Result<Config, FigureError> {
        let s = self.scale(scale)?;
        let wrap = |source: ConfigError| FigureError::Config {
            origin: self.origin.clone(),
            run: format!("(scale {scale})"),
            source: Box::new(source),
        };
        let base = match Preset::from_name(&s.base) {
            Some(preset) => preset.config().map_err(wrap)?,
            None => {
                let file = match &self.folder {
                    Some(folder) => folder.join(&s.base),
                    None => {
                        return Err(FigureError::Invalid {
                            origin: self.origin.clone(),
                            field: format!("scales.{scale}.base"),
                            message: format!(
                                "{:?} is not a preset; a shipped figure names presets only",
                                s.base
                            ),
                        })
                    }
                };
                Config::load(&file).map_err(wrap)?
            }
        };
        base.with_overrides(&s.set)
            .and_then(|c| c.with_overrides(extra))
            .map_err(wrap)
    }

    /// The scale by name.
    ///
    /// # Errors
    /// An unknown scale, naming the ones there are.
    pub fn scale(&self, scale: &str) -> Result<&Scale, FigureError> {
        self.figure
            .scales
            .get(scale)
            .ok_or_else(|| FigureError::Invalid {
                origin: self.origin.clone(),
                field: "--scale".into(),
                message: format!(
                    "{scale:?} is not a scale of this figure (one of {})",
                    self.figure
                        .scales
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The config `run` trains with, from the figure's scale config `base`
    /// ([`Source::scale_config`]): for `eio`, the base with the run's `set` and
    /// `train.method = eio`; for `baseline`, plain networks (`model.n = 1`) of `members`
    /// members trained as long as EIO's pre-training plus main epochs; for `rival`,
    /// [`crate::rivals::rival_config`] of the run's preset with the scale's `rival_set`, then
    /// the run's `set`.
    ///
    /// # Errors
    /// An unknown scale, or an assignment or preset that does not load, named with the run.
    pub fn run_config(
        &self,
        scale: &str,
        base: &Config,
        run: &RunSpec,
    ) -> Result<Config, FigureError> {
        let rival_set = &self.scale(scale)?.rival_set;
        let wrap = |source: ConfigError| FigureError::Config {
            origin: self.origin.clone(),
            run: run.id.clone(),
            source: Box::new(source),
        };
        let mut base = base.clone();
        base.run.rivals.clear();
        match run.method {
            RunMethod::Eio => {
                let mut c = base.with_overrides(&run.set).map_err(wrap)?;
                c.train.method = Method::Eio;
                Ok(c)
            }
            RunMethod::Baseline => {
                let mut c = base.with_overrides(&run.set).map_err(wrap)?;
                c.model.n = 1;
                c.train.method = Method::Baseline;
                c.train.ensemble_size = run.members.unwrap_or(1);
                c.train.epochs += c.eio.pretrain_epochs;
                Ok(c)
            }
            RunMethod::Rival => {
                let rival = RivalRun {
                    name: run.id.clone(),
                    preset: run.preset.clone().unwrap_or_default(),
                    set: rival_set.iter().chain(&run.set).cloned().collect(),
                };
                crate::rivals::rival_config(&base, &rival).map_err(wrap)
            }
        }
    }
}

impl Figure {
    /// Parses and validates a figure definition; `origin` names it in errors.
    ///
    /// # Errors
    /// [`FigureError::Parse`] or [`FigureError::Invalid`] naming the field.
    pub fn from_toml(text: &str, origin: &str) -> Result<Figure, FigureError> {
        let figure: Figure = toml::from_str(text).map_err(|e| FigureError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        figure.validate(origin)?;
        Ok(figure)
    }

    fn validate(&self, origin: &str) -> Result<(), FigureError> {
        let bad = |field: String, message: String| FigureError::Invalid {
            origin: origin.to_string(),
            field,
            message,
        };
        if self.scales.is_empty() {
            return Err(bad(
                "scales".into(),
                "a figure needs at least one scale".into(),
            ));
        }
        if self.runs.is_empty() {
            return Err(bad("runs".into(), "a figure needs at least one run".into()));
        }
        let mut ids = BTreeSet::new();
        for (i, run) in self.runs.iter().enumerate() {
            let field = format!("runs[{i}]");
            if run.id.is_empty()
                || !run
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                || run.id.starts_with('.')
            {
                return Err(bad(
                    format!("{field}.id"),
                    format!(
                        "{:?} must be letters, digits, '.', '_', '-' (a folder name)",
                        run.id
                    ),
                ));
            }
            if !ids.insert(run.id.as_str()) {
                return Err(bad(
                    format!("{field}.id"),
                    format!("{:?} is used twice", run.id),
                ));
            }
            match run.method {
                RunMethod::Rival if run.preset.is_none() => {
                    return Err(bad(
                        format!("{field}.preset"),
                        "a rival run names its preset".into(),
                    ))
                }
                RunMethod::Eio | RunMethod::Baseline if run.preset.is_some() => {
                    return Err(bad(
                        format!("{field}.preset"),
                        "only a rival run has a preset".into(),
                    ))
                }
                _ => {}
            }
            if let (Some(m), Some(size)) = (run.member, run.members) {
                if m >= size {
                    return Err(bad(
                        format!("{field}.member"),
                        format!("member {m} of an ensemble of {size}"),
                    ));
                }
            }
            if run.members == Some(0) {
                return Err(bad(format!("{field}.members"), "must be at least 1".into()));
            }
        }
        let mut names = BTreeSet::new();
        for (i, panel) in self.panels.iter().enumerate() {
            let field = format!("panels[{i}]");
            if panel.name.is_empty()
                || !panel
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
                || !names.insert(panel.name.as_str())
            {
                return Err(bad(
                    format!("{field}.name"),
                    format!(
                        "{:?} must be a unique file stem (letters, digits, '_', '-')",
                        panel.name
                    ),
                ));
            }
            for id in &panel.runs {
                if !ids.contains(id.as_str()) {
                    return Err(bad(
                        format!("{field}.runs"),
                        format!("{id:?} is not a run of this figure"),
                    ));
                }
            }
            let needs_protocol = matches!(panel.kind, PanelKind::Accuracy | PanelKind::Spread);
            match (needs_protocol, panel.protocol) {
                (true, None) => {
                    return Err(bad(
                        format!("{field}.protocol"),
                        "an accuracy or spread panel names its protocol (black-box or white-box)"
                            .into(),
                    ))
                }
                (true, Some(p)) if !self.evaluate.contains(&p.evaluation()) => {
                    return Err(bad(
                        format!("{field}.protocol"),
                        format!("{p:?} is drawn but not in `evaluate`"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The run by id.
    pub fn run(&self, id: &str) -> Option<&RunSpec> {
        self.runs.iter().find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_figure_parses_and_resolves_every_run_at_every_scale() {
        for (name, _) in BUILTIN {
            let source = Source::open(name).unwrap();
            for scale in source.figure.scales.keys() {
                let base = source.scale_config(scale, &[]).unwrap();
                for run in &source.figure.runs {
                    let c = source.run_config(scale, &base, run).unwrap();
                    assert_eq!(c.data.dataset, base.data.dataset, "{name} {}", run.id);
                }
            }
        }
    }

    /// A figure with `runs` and `panels` (TOML tables; no panel: an empty list).
    fn minimal(runs: &str, panels: &str) -> String {
        let empty = if panels.is_empty() {
            "panels = []\n"
        } else {
            ""
        };
        format!(
            "title = \"t\"\nevaluate = [\"black-box\"]\n{empty}[scales.cpu]\nbase = \"quick\"\nnote = \"n\"\n{runs}\n{panels}"
        )
    }

    #[test]
    fn bad_definitions_are_named() {
        let run = "[[runs]]\nid = \"a\"\nlabel = \"A\"\nmethod = \"eio\"\n";
        let cases = [
            (minimal(&format!("{run}{run}"), ""), "runs[1].id"),
            (
                minimal(
                    "[[runs]]\nid = \"a/b\"\nlabel = \"A\"\nmethod = \"eio\"\n",
                    "",
                ),
                "runs[0].id",
            ),
            (
                minimal(
                    "[[runs]]\nid = \"r\"\nlabel = \"R\"\nmethod = \"rival\"\n",
                    "",
                ),
                "runs[0].preset",
            ),
            (
                minimal(
                    run,
                    "[[panels]]\nname = \"p\"\ntitle = \"P\"\nkind = \"accuracy\"\nprotocol = \"black-box\"\nruns = [\"zz\"]\n",
                ),
                "panels[0].runs",
            ),
            (
                minimal(
                    run,
                    "[[panels]]\nname = \"p\"\ntitle = \"P\"\nkind = \"accuracy\"\nprotocol = \"white-box\"\nruns = [\"a\"]\n",
                ),
                "panels[0].protocol",
            ),
        ];
        for (text, field) in cases {
            let err = Figure::from_toml(&text, "f.toml").unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
            assert!(err.starts_with("f.toml"), "{err}");
        }
        let err = Source::open("fig99").unwrap_err().to_string();
        assert!(err.contains("fig3"), "{err}");
    }

    #[test]
    fn run_configs_apply_base_then_scale_then_run() {
        let text = minimal(
            "[[runs]]\nid = \"p4\"\nlabel = \"p = 4\"\nmethod = \"eio\"\nset = [\"eio.p=4\"]\n[[runs]]\nid = \"b\"\nlabel = \"B\"\nmethod = \"baseline\"\nmembers = 3\n",
            "",
        );
        let source = Source {
            figure: Figure::from_toml(&text, "f").unwrap(),
            origin: "f".into(),
            folder: None,
        };
        let base = source
            .scale_config("cpu", &["eio.p=3".to_string()])
            .unwrap();
        assert_eq!(base.eio.p, 3);
        let eio = source
            .run_config("cpu", &base, &source.figure.runs[0])
            .unwrap();
        assert_eq!((eio.eio.p, eio.train.method), (4, Method::Eio));
        let b = source
            .run_config("cpu", &base, &source.figure.runs[1])
            .unwrap();
        assert_eq!(
            (b.model.n, b.train.ensemble_size, b.train.method),
            (1, 3, Method::Baseline)
        );
        assert_eq!(b.train.epochs, base.train.epochs + base.eio.pretrain_epochs);
        assert!(source.scale_config("paper", &[]).is_err());
    }
}
