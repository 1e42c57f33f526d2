//! SVG plots (plotters): titled, labelled axes with units, a legend, one colour per algorithm.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
    /// Half-widths of an error band (standard errors), same length as `points`, or empty.
    pub band: Vec<f64>,
}

impl Series {
    pub fn new(label: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            color,
            dashed: false,
            points,
            band: Vec::new(),
        }
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn with_band(mut self, band: Vec<f64>) -> Self {
        self.band = band;
        self
    }
}

/// The colour of an algorithm (or of the warm start / optimum), fixed across every plot.
pub fn algo_color(name: &str) -> RGBColor {
    match name {
        "grpo" => RGBColor(31, 119, 180),
        "mrt" => RGBColor(214, 39, 40),
        "mrt-dense" => RGBColor(44, 160, 44),
        "star" => RGBColor(148, 103, 189),
        "mrt-star" => RGBColor(140, 86, 75),
        "warm start" | "base" => RGBColor(127, 127, 127),
        "bayes-optimal" | "optimal" => RGBColor(0, 0, 0),
        _ => RGBColor(255, 127, 14),
    }
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("plot: {e}")))
}

/// A line chart written as SVG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let (x0, x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = y_range.unwrap_or_else(|| {
        let (lo, hi) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        (lo - pad, hi + pad)
    });
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for s in series {
        let color = s.color;
        if s.band.len() == s.points.len() && !s.band.is_empty() {
            let upper = s.points.iter().zip(&s.band).map(|(p, b)| (p.0, p.1 + b));
            let lower: Vec<(f64, f64)> = s
                .points
                .iter()
                .zip(&s.band)
                .map(|(p, b)| (p.0, p.1 - b))
                .rev()
                .collect();
            let polygon: Vec<(f64, f64)> = upper.chain(lower).collect();
            chart
                .draw_series(std::iter::once(Polygon::new(polygon, color.mix(0.15).filled())))
                .map_err(|e| plot_err(path, e))?;
        }
        let style = ShapeStyle::from(&color).stroke_width(2);
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))
        }
        .map_err(|e| plot_err(path, e))?;
        drawn.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&color).stroke_width(2))
        });
        if !s.dashed && s.points.len() <= 40 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}
