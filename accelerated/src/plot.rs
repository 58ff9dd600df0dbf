//! `eio plot`: a sweep folder's finished runs drawn as the figure's panels (SVG and PNG with
//! `plotters`), with `figure.md` (the plots, the tables behind them, the scale and what is
//! missing) and the data as CSV (`results.csv`, `costs.csv`, `curves.csv`).
//!
//! Panels ([`eio_spec::figure::PanelKind`]): accuracy against ε, a line per run, ε = 0 being
//! clean accuracy (Figs. 3-6); per-epoch accuracy through every stage of a run (Fig. 7 left);
//! training time per run by phase (Fig. 7 right); the runs side by side at each ε with their
//! spread (Fig. 8). A panel draws the runs that exist and `figure.md` names the others.

use std::fmt::Write as _;
use std::path::Path as FsPath;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::experiment::{ExperimentError, RunDir};
use crate::safe_write::write_atomically;
use crate::sweep::{RunResult, Sweep};
use eio_spec::figure::{Panel, PanelKind, PanelProtocol};

/// The font every label is drawn in (DejaVu Sans, its licence beside it in `assets/`), so a
/// plot looks the same on every machine, with or without fonts installed.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const SIZE: (u32, u32) = (760, 480);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans is a valid font"));
    });
}

/// What `eio plot` wrote.
#[derive(Debug, Clone, Default)]
pub struct PlotSummary {
    /// Files written, relative to the output folder.
    pub files: Vec<String>,
    /// Runs of the figure without a result.
    pub missing: Vec<String>,
}

/// One line (or group of bars) of a panel.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Draws every panel of `sweep` from `results` (the figure's order; `None` for a missing run)
/// into `out`, with `figure.md` and the CSV files.
///
/// # Errors
/// A drawing or write error, naming the file.
pub fn plot(
    sweep: &Sweep,
    results: &[Option<RunResult>],
    out: &FsPath,
) -> Result<PlotSummary, ExperimentError> {
    register_font();
    std::fs::create_dir_all(out).map_err(RunDir::write_err(out))?;
    let figure = &sweep.record.figure;
    let mut summary = PlotSummary {
        missing: figure
            .runs
            .iter()
            .zip(results)
            .filter(|(_, r)| r.is_none())
            .map(|(run, _)| run.id.clone())
            .collect(),
        ..PlotSummary::default()
    };
    let by_id = |id: &str| -> Option<&RunResult> {
        figure
            .runs
            .iter()
            .position(|r| r.id == id)
            .and_then(|i| results[i].as_ref())
    };
    let mut md = header(sweep, results, &summary.missing);
    for panel in &figure.panels {
        let runs: Vec<&RunResult> = panel.runs.iter().filter_map(|id| by_id(id)).collect();
        let missing: Vec<&String> = panel.runs.iter().filter(|id| by_id(id).is_none()).collect();
        let _ = writeln!(md, "## {}\n", panel.title);
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            let _ = writeln!(md, "Missing (not finished): {}.\n", names.join(", "));
        }
        if runs.is_empty() {
            let _ = writeln!(md, "Nothing to draw yet.\n");
            continue;
        }
        let (series, x_label, y_label) = panel_series(panel, &runs);
        for (ext, bytes) in render(panel, &series, &x_label, &y_label)? {
            let name = format!("{}.{ext}", panel.name);
            let path = out.join(&name);
            write_atomically(&path, &bytes).map_err(RunDir::write_err(&path))?;
            summary.files.push(name);
        }
        let _ = writeln!(md, "![{}]({}.svg)\n", panel.title, panel.name);
        md.push_str(&panel_table(panel, &runs, &series));
        md.push('\n');
    }
    md.push_str(&runs_table(sweep, results));
    for (name, text) in [
        ("results.csv", results_csv(results)),
        ("costs.csv", costs_csv(results)),
        ("curves.csv", curves_csv(results)),
        ("figure.md", md),
    ] {
        let path = out.join(name);
        write_atomically(&path, text.as_bytes()).map_err(RunDir::write_err(&path))?;
        summary.files.push(name.to_string());
    }
    Ok(summary)
}

fn header(sweep: &Sweep, results: &[Option<RunResult>], missing: &[String]) -> String {
    let r = &sweep.record;
    let scale = r.figure.scales.get(&r.scale);
    let mut md = format!("# {}\n\n", r.figure.title);
    let _ = writeln!(
        md,
        "**Scale `{}`**: {}\n",
        r.scale,
        scale.map_or("", |s| s.note.as_str())
    );
    if !r.figure.paper.is_empty() {
        let _ = writeln!(md, "**The paper**: {}\n", r.figure.paper);
    }
    let set = if r.set.is_empty() {
        String::new()
    } else {
        format!(
            " {}",
            r.set
                .iter()
                .map(|s| format!("--set '{s}'"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let _ = writeln!(
        md,
        "Made by `eio sweep {} --scale {}{set}` and `eio plot`: {} of {} runs finished. Accuracy is all-or-nothing (an image counts only if every attack version fails on it), in percent of the evaluation images; eps = 0 is clean accuracy.\n",
        r.origin,
        r.scale,
        results.iter().flatten().count(),
        results.len()
    );
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "**Missing runs** (drawn without them): {}.\n",
            missing.join(", ")
        );
    }
    md
}

/// Total training seconds of a run (every phase of every stage).
fn training_seconds(r: &RunResult) -> f64 {
    r.costs.iter().map(|c| c.seconds).sum()
}

fn protocol_name(p: Option<PanelProtocol>) -> &'static str {
    match p {
        Some(PanelProtocol::WhiteBox) => "white-box",
        _ => "black-box",
    }
}

/// The panel's series and axis labels.
fn panel_series(panel: &Panel, runs: &[&RunResult]) -> (Vec<Series>, String, String) {
    let protocol = protocol_name(panel.protocol);
    match panel.kind {
        PanelKind::Accuracy => (
            runs.iter()
                .map(|r| Series {
                    label: r.label.clone(),
                    points: std::iter::once((0.0, 100.0 * r.clean_accuracy))
                        .chain(
                            r.accuracy
                                .iter()
                                .filter(|a| a.protocol == protocol)
                                .map(|a| (a.eps, 100.0 * a.accuracy)),
                        )
                        .collect(),
                })
                .collect(),
            "attack radius eps (0 = clean)".into(),
            format!("{protocol} accuracy (%)"),
        ),
        PanelKind::Spread => {
            let mut eps: Vec<f64> = Vec::new();
            for r in runs {
                for a in r.accuracy.iter().filter(|a| a.protocol == protocol) {
                    if !eps.contains(&a.eps) {
                        eps.push(a.eps);
                    }
                }
            }
            eps.sort_by(f64::total_cmp);
            let mut series = vec![Series {
                label: "clean".into(),
                points: runs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| ((i + 1) as f64, 100.0 * r.clean_accuracy))
                    .collect(),
            }];
            for e in eps {
                series.push(Series {
                    label: format!("eps {e}"),
                    points: runs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| {
                            r.accuracy
                                .iter()
                                .find(|a| a.protocol == protocol && a.eps == e)
                                .map(|a| ((i + 1) as f64, 100.0 * a.accuracy))
                        })
                        .collect(),
                });
            }
            (
                series,
                "derived sub-model".into(),
                format!("{protocol} accuracy (%)"),
            )
        }
        PanelKind::Curves => (
            runs.iter()
                .map(|r| Series {
                    label: r.label.clone(),
                    points: r
                        .curve
                        .iter()
                        .map(|p| ((p.epoch + 1) as f64, 100.0 * p.accuracy))
                        .collect(),
                })
                .collect(),
            "epoch (all stages of the run)".into(),
            "held-out accuracy (%)".into(),
        ),
        PanelKind::Cost => (
            runs.iter()
                .enumerate()
                .map(|(i, r)| Series {
                    label: r.label.clone(),
                    points: vec![(i as f64, training_seconds(r))],
                })
                .collect(),
            "run".into(),
            "training time (s)".into(),
        ),
    }
}

/// The panel as SVG and PNG bytes.
fn render(
    panel: &Panel,
    series: &[Series],
    x_label: &str,
    y_label: &str,
) -> Result<Vec<(&'static str, Vec<u8>)>, ExperimentError> {
    let fail = |e: String| ExperimentError::Usage(format!("drawing panel {}: {e}", panel.name));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, panel, series, x_label, y_label).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        draw(&root, panel, series, x_label, y_label).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
        .map_err(|e| fail(e.to_string()))?;
    Ok(vec![("svg", svg.into_bytes()), ("png", png)])
}

use image::ImageEncoder as _;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panel: &Panel,
    series: &[Series],
    x_label: &str,
    y_label: &str,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let points = series.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let cost = panel.kind == PanelKind::Cost;
    let (x0, x1) = if cost || panel.kind == PanelKind::Spread {
        (x0 - 0.6, x1 + 0.6)
    } else {
        let pad = (x1 - x0).max(1e-3) * 0.04;
        (x0 - pad, x1 + pad)
    };
    let y1 = if cost { y1 * 1.15 + 1.0 } else { 100.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(err)?;
    let labels: Vec<String> = series.iter().map(|s| s.label.clone()).collect();
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .max_light_lines(1)
        .label_style(("sans-serif", 13));
    let formatter = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    let whole = |x: &f64| format!("{x:.0}");
    match panel.kind {
        PanelKind::Cost => {
            mesh.x_labels(labels.len() * 2 + 1)
                .x_label_formatter(&formatter)
                .disable_x_mesh();
        }
        PanelKind::Spread | PanelKind::Curves => {
            let span = (x1 - x0).round() as usize;
            mesh.x_labels(span.clamp(2, 12) + 1)
                .x_label_formatter(&whole);
        }
        PanelKind::Accuracy => {}
    }
    mesh.draw().map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if cost {
            for &(x, y) in &s.points {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x - 0.3, 0.0), (x + 0.3, y)],
                        color.filled(),
                    )))
                    .map_err(err)?;
            }
            continue;
        }
        let line_style = color.stroke_width(2);
        let drawn = if panel.kind == PanelKind::Spread {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(err)?
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), line_style))
                .map_err(err)?;
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?
        };
        drawn.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
        });
    }
    if !cost {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(if panel.kind == PanelKind::Curves {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// The table behind a panel.
fn panel_table(panel: &Panel, runs: &[&RunResult], series: &[Series]) -> String {
    let protocol = protocol_name(panel.protocol);
    let mut md = String::new();
    match panel.kind {
        PanelKind::Accuracy | PanelKind::Spread => {
            let mut eps: Vec<f64> = Vec::new();
            for r in runs {
                for a in r.accuracy.iter().filter(|a| a.protocol == protocol) {
                    if !eps.contains(&a.eps) {
                        eps.push(a.eps);
                    }
                }
            }
            eps.sort_by(f64::total_cmp);
            let _ = write!(md, "| run | clean (%) |");
            for e in &eps {
                let _ = write!(md, " {protocol} eps {e} (%) |");
            }
            md.push_str("\n|---|---|");
            md.push_str(&"---|".repeat(eps.len()));
            md.push('\n');
            for r in runs {
                let _ = write!(md, "| {} | {} |", r.label, pct(r.clean_accuracy));
                for e in &eps {
                    let cell = r
                        .accuracy
                        .iter()
                        .find(|a| a.protocol == protocol && a.eps == *e)
                        .map_or("-".to_string(), |a| pct(a.accuracy));
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
            if panel.kind == PanelKind::Spread {
                let _ = writeln!(
                    md,
                    "\nSpread over the {} sub-models (percentage points):\n\n| | mean | min | max | max - min | standard deviation |\n|---|---|---|---|---|---|",
                    runs.len()
                );
                for s in series {
                    let ys: Vec<f64> = s.points.iter().map(|p| p.1).collect();
                    if ys.is_empty() {
                        continue;
                    }
                    let n = ys.len() as f64;
                    let mean = ys.iter().sum::<f64>() / n;
                    let min = ys.iter().copied().fold(f64::MAX, f64::min);
                    let max = ys.iter().copied().fold(f64::MIN, f64::max);
                    let sd = (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n).sqrt();
                    let _ = writeln!(
                        md,
                        "| {} | {mean:.1} | {min:.1} | {max:.1} | {:.1} | {sd:.2} |",
                        s.label,
                        max - min
                    );
                }
            }
        }
        PanelKind::Curves => {
            md.push_str(
                "| run | epochs | first (%) | last (%) | best (%) |\n|---|---|---|---|---|\n",
            );
            for r in runs {
                let acc: Vec<f64> = r.curve.iter().map(|p| p.accuracy).collect();
                if let (Some(first), Some(last)) = (acc.first(), acc.last()) {
                    let best = acc.iter().copied().fold(f64::MIN, f64::max);
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} |",
                        r.label,
                        acc.len(),
                        pct(*first),
                        pct(*last),
                        pct(best)
                    );
                }
            }
            md.push_str("\nPer epoch: `curves.csv`.\n");
        }
        PanelKind::Cost => {
            md.push_str("| run | phase | epochs | images | seconds | images/s |\n|---|---|---|---|---|---|\n");
            for r in runs {
                for c in &r.costs {
                    let _ = writeln!(
                        md,
                        "| {} | {:?} ({}) | {} | {} | {:.1} | {:.1} |",
                        r.label,
                        c.phase,
                        c.stage,
                        c.epochs,
                        c.images,
                        c.seconds,
                        c.images_per_second
                    );
                }
                let _ = writeln!(
                    md,
                    "| **{}** | total | | | **{:.1}** | |",
                    r.label,
                    training_seconds(r)
                );
            }
            md.push_str("\nTimes are measured wall times of the training epochs (`metrics.jsonl`); a stage shared by several runs counts in each.\n");
        }
    }
    md
}

fn runs_table(sweep: &Sweep, results: &[Option<RunResult>]) -> String {
    let mut md = String::from(
        "## Runs\n\n| id | label | method | finished | training (s) | evaluation (s) | stages | derived path |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (run, r) in sweep.record.figure.runs.iter().zip(results) {
        match r {
            Some(r) => {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | yes | {:.0} | {:.0} | {} | {} |",
                    r.id,
                    r.label,
                    r.method,
                    training_seconds(r),
                    r.eval_seconds,
                    r.stages.join(", "),
                    r.derived_path.as_deref().unwrap_or("")
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:?} | no | | | | |",
                    run.id, run.label, run.method
                );
            }
        }
    }
    md.push_str("\nData: `results.csv` (accuracy), `costs.csv` (training time by phase), `curves.csv` (per-epoch accuracy).\n");
    md
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn results_csv(results: &[Option<RunResult>]) -> String {
    let mut out = String::from("run,label,method,protocol,eps,accuracy,images\n");
    for r in results.iter().flatten() {
        let (id, label) = (csv_field(&r.id), csv_field(&r.label));
        let _ = writeln!(
            out,
            "{id},{label},{},clean,0,{},{}",
            r.method, r.clean_accuracy, r.clean_images
        );
        for a in &r.accuracy {
            let _ = writeln!(
                out,
                "{id},{label},{},{},{},{},{}",
                r.method, a.protocol, a.eps, a.accuracy, a.images
            );
        }
    }
    out
}

fn costs_csv(results: &[Option<RunResult>]) -> String {
    let mut out = String::from("run,label,stage,phase,epochs,images,seconds,images_per_second\n");
    for r in results.iter().flatten() {
        for c in &r.costs {
            let _ = writeln!(
                out,
                "{},{},{},{:?},{},{},{:.3},{:.3}",
                csv_field(&r.id),
                csv_field(&r.label),
                c.stage,
                c.phase,
                c.epochs,
                c.images,
                c.seconds,
                c.images_per_second
            );
        }
    }
    out
}

fn curves_csv(results: &[Option<RunResult>]) -> String {
    let mut out = String::from("run,label,stage,phase,epoch,accuracy\n");
    for r in results.iter().flatten() {
        for p in &r.curve {
            let _ = writeln!(
                out,
                "{},{},{},{:?},{},{}",
                csv_field(&r.id),
                csv_field(&r.label),
                p.stage,
                p.phase,
                p.epoch,
                p.accuracy
            );
        }
    }
    out
}
