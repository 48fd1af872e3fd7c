//! Charts of a sweep (`--plot FILE`): an SVG or PNG file, picked by the file's extension.
//!
//! A [`PlotSpec`] names one numeric case parameter as the x axis (`qd`, `hashes`, ...), the figures
//! drawn on the y axis (one row of charts per [`Row`]), the parameters that split the cases into
//! lines (`group_by`) and the parameters that split them into side-by-side charts (`panel_by`).
//! Cases that lack the x parameter or a figure are left out of that chart.
//!
//! Text is laid out (and, in PNG files, drawn) with DejaVu Sans compiled into the binary, so no
//! system font library or font file is needed; SVG files name the font family `sans-serif` and
//! leave the glyphs to the viewer.

use crate::report::{Case, Report};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A figure of a case, drawn on a chart's y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// `p50_us`.
    P50Us,
    /// `p90_us`.
    P90Us,
    /// `p99_us`.
    P99Us,
    /// `max_us`.
    MaxUs,
    /// `ops_per_s`.
    OpsPerS,
    /// `gbps`.
    Gbps,
    /// `iops`.
    Iops,
}

impl Figure {
    /// The figure's value in `case`, when the case has it.
    pub fn of(self, case: &Case) -> Option<f64> {
        match self {
            Figure::P50Us => case.p50_us,
            Figure::P90Us => case.p90_us,
            Figure::P99Us => case.p99_us,
            Figure::MaxUs => case.max_us,
            Figure::OpsPerS => case.ops_per_s,
            Figure::Gbps => case.gbps,
            Figure::Iops => case.iops,
        }
    }

    /// The figure's short name, used in line labels (`p99`, `GB/s`).
    pub fn short(self) -> &'static str {
        match self {
            Figure::P50Us => "p50",
            Figure::P90Us => "p90",
            Figure::P99Us => "p99",
            Figure::MaxUs => "max",
            Figure::OpsPerS => "ops/s",
            Figure::Gbps => "GB/s",
            Figure::Iops => "IOPS",
        }
    }
}

/// One row of charts: the figures on the y axis (one line per figure and group).
#[derive(Debug, Clone)]
pub struct Row {
    /// Figures drawn in each chart of the row.
    pub figures: Vec<Figure>,
    /// Logarithmic y axis (base 10).
    pub y_log: bool,
    /// The y axis description.
    pub y_label: String,
}

/// What to draw from a report.
#[derive(Debug, Clone)]
pub struct PlotSpec {
    /// Title over all charts.
    pub title: String,
    /// The numeric case parameter on the x axis.
    pub x_param: String,
    /// The x axis description.
    pub x_label: String,
    /// Logarithmic x axis (base 2, ticks at powers of two).
    pub x_log2: bool,
    /// Parameters whose values make one line each (block size, ...).
    pub group_by: Vec<String>,
    /// Words before the legend (`block size`); empty for none.
    pub legend_title: String,
    /// Parameters whose values make one chart each, side by side (operation and mode, ...).
    pub panel_by: Vec<String>,
    /// Rows of charts, one per y figure set.
    pub rows: Vec<Row>,
}

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The file name ends in neither `.svg` nor `.png`.
    #[error("cannot tell the chart format of {0}: name the file *.svg or *.png")]
    Format(PathBuf),
    /// No case had the x parameter and a figure to draw.
    #[error("nothing to plot: no case has the parameter `{0}` and a figure of the chart")]
    NoData(String),
    /// Drawing failed.
    #[error("drawing the chart failed: {0}")]
    Draw(String),
    /// Writing the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The chart file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Width of one chart, pixels.
const PANEL_W: u32 = 500;
/// Height of one chart, pixels.
const PANEL_H: u32 = 340;
/// Height of the title band (title and legend), pixels.
const TITLE_H: u32 = 64;
/// Charts side by side at most; more panels wrap onto further rows.
const MAX_COLS: usize = 4;
/// Line colours (Tableau 10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Writes a chart of `report` drawn as `spec` says to `path` (`.svg` or `.png`).
pub fn plot(report: &Report, spec: &PlotSpec, path: &Path) -> Result<(), PlotError> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("svg") => Format::Svg,
        Some("png") => Format::Png,
        _ => return Err(PlotError::Format(path.to_path_buf())),
    };
    register_font();
    let layout = Layout::of(report, spec)?;
    let size = layout.size(spec);
    match format {
        Format::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
                draw(&root, report, spec, &layout)?;
                root.present().map_err(draw_err)?;
            }
            std::fs::write(path, text).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })
        }
        Format::Png => {
            let mut rgb = vec![255u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                draw(&root, report, spec, &layout)?;
                root.present().map_err(draw_err)?;
            }
            write_png(path, size, &rgb)
        }
    }
}

/// The `socket` suite's chart: p50 and p99 lookup latency against the batch size (`hashes`).
pub fn socket_spec(report: &Report) -> PlotSpec {
    let shards = report.cases.first().and_then(|c| c.params.get("shards")).and_then(Value::as_u64).unwrap_or(0);
    PlotSpec {
        title: format!(
            "kvloft bench socket: lookup round trips, {shards} shard(s) ({}, {})",
            report.machine.hostname, report.started_at
        ),
        x_param: "hashes".into(),
        x_label: "hashes per lookup".into(),
        x_log2: true,
        group_by: Vec::new(),
        legend_title: String::new(),
        panel_by: Vec::new(),
        rows: vec![Row { figures: vec![Figure::P50Us, Figure::P99Us], y_log: false, y_label: "latency (µs)".into() }],
    }
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Svg,
    Png,
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Registers the built-in font as `sans-serif` (once per process).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid TrueType font; a failure here would only lose the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<(), PlotError> {
    let io = |source: std::io::Error| PlotError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| io(std::io::Error::other(e)))?;
    writer.write_image_data(rgb).map_err(|e| io(std::io::Error::other(e)))?;
    writer.finish().map_err(|e| io(std::io::Error::other(e)))
}

/// The panels (distinct `panel_by` values, in the order of first appearance).
#[derive(Debug)]
struct Layout {
    panels: Vec<Vec<String>>,
}

impl Layout {
    fn of(report: &Report, spec: &PlotSpec) -> Result<Self, PlotError> {
        let mut panels: Vec<Vec<String>> = Vec::new();
        let mut any = false;
        for c in &report.cases {
            if x_of(c, spec).is_none() {
                continue;
            }
            if !spec.rows.iter().any(|r| r.figures.iter().any(|f| f.of(c).is_some())) {
                continue;
            }
            any = true;
            let key = key_of(c, &spec.panel_by);
            if !panels.contains(&key) {
                panels.push(key);
            }
        }
        if !any {
            return Err(PlotError::NoData(spec.x_param.clone()));
        }
        Ok(Self { panels })
    }

    fn cols(&self) -> usize {
        self.panels.len().clamp(1, MAX_COLS)
    }

    fn panel_rows(&self) -> usize {
        self.panels.len().div_ceil(self.cols()).max(1)
    }

    fn size(&self, spec: &PlotSpec) -> (u32, u32) {
        let rows = (spec.rows.len().max(1) * self.panel_rows()) as u32;
        // Wide enough for the title (20 px text averages under 11 px a character).
        let title_w = spec.title.chars().count() as u32 * 11 + 40;
        ((self.cols() as u32 * PANEL_W).max(title_w), rows * PANEL_H + TITLE_H)
    }
}

/// The case's x value, in axis space (log2 when the axis is logarithmic).
fn x_of(case: &Case, spec: &PlotSpec) -> Option<f64> {
    let v = case.params.get(&spec.x_param)?.as_f64()?;
    if spec.x_log2 {
        (v > 0.0).then(|| v.log2())
    } else {
        Some(v)
    }
}

/// The formatted values of `params` in `case` (missing ones as `-`).
fn key_of(case: &Case, params: &[String]) -> Vec<String> {
    params.iter().map(|p| case.params.get(p).map_or_else(|| "-".to_string(), |v| format_param(p, v))).collect()
}

/// A parameter value for a label: sizes of `*_bytes` parameters in binary units.
pub fn format_param(name: &str, v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if name.ends_with("_bytes") => n.as_u64().map_or_else(|| n.to_string(), format_bytes),
        Value::Bool(b) => format!("{name}={b}"),
        other => other.to_string(),
    }
}

/// `4096` as `4 KiB`, `1048576` as `1 MiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024 && v % 1024 == 0 && u + 1 < UNITS.len() {
        v /= 1024;
        u += 1;
    }
    format!("{v} {}", UNITS[u])
}

/// A tick value: at most three significant digits, `k`/`M`/`G` for thousands and up.
fn format_number(v: f64) -> String {
    let a = v.abs();
    let (d, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if d == d.round() {
        format!("{d:.0}")
    } else if d.abs() >= 10.0 {
        format!("{d:.1}")
    } else if d.abs() >= 0.1 {
        format!("{d:.2}")
    } else {
        format!("{d:.3}")
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s}{suffix}")
}

/// One line of a chart.
#[derive(Debug)]
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

/// The lines of the chart at (`panel`, `row`), y values in axis space.
fn series_of(report: &Report, spec: &PlotSpec, panel: &[String], row: &Row) -> Vec<Series> {
    let mut out: Vec<(Vec<String>, Figure, Series)> = Vec::new();
    for c in &report.cases {
        if key_of(c, &spec.panel_by) != panel {
            continue;
        }
        let Some(x) = x_of(c, spec) else { continue };
        let group = key_of(c, &spec.group_by);
        for &f in &row.figures {
            let Some(y) = f.of(c) else { continue };
            let y = if row.y_log {
                if y <= 0.0 {
                    continue;
                }
                y.log10()
            } else {
                y
            };
            match out.iter_mut().find(|(g, ff, _)| *g == group && *ff == f) {
                Some((_, _, s)) => s.points.push((x, y)),
                None => {
                    let mut label = group.join(" ");
                    if row.figures.len() > 1 || label.is_empty() {
                        if !label.is_empty() {
                            label.push(' ');
                        }
                        label.push_str(f.short());
                    }
                    out.push((group.clone(), f, Series { label, points: vec![(x, y)] }));
                }
            }
        }
    }
    out.into_iter()
        .map(|(_, _, mut s)| {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            s
        })
        .collect()
}

/// An axis range in axis space and its label count: whole decades or octaves when logarithmic.
fn axis_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64, usize) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0, 2);
    }
    if log {
        let (mut a, mut b) = (lo.floor(), hi.ceil());
        if a == b {
            a -= 1.0;
            b += 1.0;
        }
        (a, b, (b - a) as usize + 1)
    } else {
        let lo = lo.min(0.0);
        let hi = if hi <= lo { lo + 1.0 } else { hi + (hi - lo) * 0.08 };
        (lo, hi, 6)
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
    spec: &PlotSpec,
    layout: &Layout,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err)?;
    let (w, _) = root.dim_in_pixel();
    let (top, body) = root.split_vertically(TITLE_H);
    top.draw(&Text::new(
        spec.title.clone(),
        (w as i32 / 2, 12),
        ("sans-serif", 20).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(draw_err)?;
    let cols = layout.cols();
    let panel_rows = layout.panel_rows();
    let areas = body.split_evenly((spec.rows.len().max(1) * panel_rows, cols));
    // Every chart draws a line label in the same colour; one legend in the title band says which.
    let mut labels: Vec<String> = Vec::new();
    let mut charts = Vec::new();
    for (r, row) in spec.rows.iter().enumerate() {
        for (p, panel) in layout.panels.iter().enumerate() {
            let series = series_of(report, spec, panel, row);
            for s in &series {
                if !labels.contains(&s.label) {
                    labels.push(s.label.clone());
                }
            }
            charts.push(((r * panel_rows + p / cols) * cols + p % cols, row, panel.join(" · "), series));
        }
    }
    let color = |label: &str| COLORS[labels.iter().position(|l| l == label).unwrap_or(0) % COLORS.len()];
    for (i, row, caption, series) in &charts {
        draw_chart(&areas[*i], spec, row, caption, series, &color)?;
    }
    draw_legend(&top, &spec.legend_title, &labels, &color)
}

/// The line labels and their colours, centred in a row under the title.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    labels: &[String],
    color: &dyn Fn(&str) -> RGBColor,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let font = ("sans-serif", 15).into_font();
    let style: TextStyle = font.clone().into();
    let text_w = |t: &str| area.estimate_text_size(t, &style).map_or(8 * t.len() as i32, |(w, _)| w as i32);
    let widths: Vec<i32> = labels.iter().map(|l| text_w(l) + 24 + 20).collect();
    let title_w = if title.is_empty() { 0 } else { text_w(title) + 14 };
    let (w, _) = area.dim_in_pixel();
    let mut x = (w as i32 - title_w - widths.iter().sum::<i32>()) / 2;
    let y = TITLE_H as i32 - 18;
    if !title.is_empty() {
        area.draw(&Text::new(
            format!("{title}:"),
            (x, y),
            font.clone().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(draw_err)?;
        x += title_w;
    }
    for (l, lw) in labels.iter().zip(&widths) {
        let c = color(l);
        area.draw(&PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))).map_err(draw_err)?;
        area.draw(&Circle::new((x + 9, y), 3, c.filled())).map_err(draw_err)?;
        area.draw(&Text::new(
            l.clone(),
            (x + 24, y),
            font.clone().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(draw_err)?;
        x += lw;
    }
    Ok(())
}

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    spec: &PlotSpec,
    row: &Row,
    caption: &str,
    series: &[Series],
    color: &dyn Fn(&str) -> RGBColor,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let (x0, x1, nx) = axis_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), spec.x_log2);
    let (y0, y1, ny) = axis_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), row.y_log);
    let mut builder = ChartBuilder::on(area);
    builder.margin(10).margin_right(18).x_label_area_size(40).y_label_area_size(62);
    if !caption.is_empty() {
        builder.caption(caption, ("sans-serif", 16));
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(draw_err)?;
    let x_bytes = spec.x_param.ends_with("_bytes");
    let x_fmt = |v: &f64| -> String {
        let v = if spec.x_log2 {
            if (v - v.round()).abs() > 1e-6 {
                return String::new();
            }
            2f64.powf(v.round())
        } else {
            *v
        };
        if x_bytes && v >= 1.0 {
            format_bytes(v.round() as u64)
        } else {
            format_number(v)
        }
    };
    let y_fmt = |v: &f64| -> String {
        if row.y_log {
            if (v - v.round()).abs() > 1e-6 {
                return String::new();
            }
            format_number(10f64.powf(v.round()))
        } else {
            format_number(*v)
        }
    };
    chart
        .configure_mesh()
        .x_labels(nx)
        .y_labels(ny)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(spec.x_label.as_str())
        .y_desc(row.y_label.as_str())
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .x_max_light_lines(if spec.x_log2 { 0 } else { 4 })
        .y_max_light_lines(if row.y_log { 0 } else { 4 })
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(205, 205, 205))
        .draw()
        .map_err(draw_err)?;
    if series.is_empty() {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no data",
            (w as i32 / 2, h as i32 / 2),
            ("sans-serif", 14).into_font().color(&RGBColor(127, 127, 127)),
        ))
        .map_err(draw_err)?;
        return Ok(());
    }
    for s in series {
        let c = color(&s.label);
        chart.draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2))).map_err(draw_err)?;
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(draw_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_labels() {
        assert_eq!(format_bytes(4096), "4 KiB");
        assert_eq!(format_bytes(1 << 20), "1 MiB");
        assert_eq!(format_bytes(1536), "1536 B");
        assert_eq!(format_param("block_bytes", &Value::from(262_144u64)), "256 KiB");
        assert_eq!(format_param("mode", &Value::from("direct")), "direct");
    }

    #[test]
    fn tick_numbers() {
        assert_eq!(format_number(100_000.0), "100k");
        assert_eq!(format_number(1e6), "1M");
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(format_number(12.0), "12");
    }

    #[test]
    fn log_axes_cover_whole_decades() {
        assert_eq!(axis_range([0.3f64, 1.7].into_iter(), true), (0.0, 2.0, 3));
        assert_eq!(axis_range([2.0f64].into_iter(), true), (1.0, 3.0, 3));
    }
}
