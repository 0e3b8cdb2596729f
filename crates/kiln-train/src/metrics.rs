//! What a run leaves behind for people: `metrics.jsonl` (one object per logging step, TRL's key
//! names) and a loss-curve PNG.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_core::{Error, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One logged step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// A recipe's own metrics under TRL's names (`rewards/accuracies`, `objective/kl`, …;
    /// evaluation ones prefixed `eval_`), means over the steps since the last line.
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

/// Appends records to `metrics.jsonl`, flushing each so a crash loses nothing logged.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|source| Error::Json {
            path: self.path.clone(),
            source,
        })?;
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads `metrics.jsonl` back, keeping the last record of each step (a resumed run may have
/// logged a step twice).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records: Vec<MetricsRecord> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: MetricsRecord = serde_json::from_str(line)
            .map_err(|e| Error::InvalidInput(format!("{}:{}: {e}", path.display(), i + 1)))?;
        records.retain(|old| old.step != r.step);
        records.push(r);
    }
    records.sort_by_key(|r| r.step);
    Ok(records)
}

/// Draws training and evaluation loss against the step into a PNG.
pub fn plot_loss(records: &[MetricsRecord], title: &str, out: &Path) -> Result<()> {
    let train = points(records, |r| r.loss);
    let eval = points(records, |r| r.eval_loss);
    let mut series = vec![Series::line("train loss", train, BLUE)];
    if !eval.is_empty() {
        series.push(Series::line("eval loss", eval, RED).with_markers());
    }
    draw(&series, title, "loss", out)
}

/// Draws a recipe's metrics (`records[].extra`, e.g. `rewards/chosen`, `objective/scores`)
/// against the step into a PNG, one line per key that was logged; an `eval_` key is drawn with
/// markers. An error when none of `keys` was logged.
pub fn plot_metrics(
    records: &[MetricsRecord],
    keys: &[&str],
    (title, y_desc): (&str, &str),
    out: &Path,
) -> Result<()> {
    const COLORS: [RGBColor; 6] = [
        BLUE,
        RED,
        RGBColor(0, 150, 70),
        RGBColor(230, 130, 0),
        MAGENTA,
        RGBColor(90, 90, 90),
    ];
    let series: Vec<Series> = keys
        .iter()
        .map(|&key| points(records, |r| r.extra.get(key).copied()))
        .zip(keys)
        .filter(|(p, _)| !p.is_empty())
        .zip(COLORS.iter().cycle())
        .map(|((p, &key), &color)| {
            let line = Series::line(key, p, color);
            if key.starts_with("eval_") {
                line.with_markers()
            } else {
                line
            }
        })
        .collect();
    draw(&series, title, y_desc, out)
}

/// `(step, value)` of every record that has the value.
fn points(
    records: &[MetricsRecord],
    value: impl Fn(&MetricsRecord) -> Option<f64>,
) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.step as f64, value(r)?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// One line of a chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    markers: bool,
}

impl Series {
    fn line(label: &str, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Self {
            label: label.to_string(),
            points,
            color,
            markers: false,
        }
    }

    fn with_markers(mut self) -> Self {
        self.markers = true;
        self
    }
}

/// Draws `series` against the step into a PNG.
fn draw(series: &[Series], title: &str, y_desc: &str, out: &Path) -> Result<()> {
    let plot_err = |e: String| {
        Error::InvalidInput(format!(
            "{}: cannot draw the {y_desc} curve: {e}",
            out.display()
        ))
    };
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in series.iter().flat_map(|s| &s.points) {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        return Err(plot_err(format!("no {y_desc} logged")));
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    for s in series {
        let style = s.color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.clone(), style))
            .map_err(|e| plot_err(e.to_string()))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if s.markers {
            let fill = s.color.filled();
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, fill)))
                .map_err(|e| plot_err(e.to_string()))?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}
