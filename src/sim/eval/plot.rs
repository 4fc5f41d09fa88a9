//! Figures as SVG (plotters' SVG backend, no system fonts: text is left to
//! the viewer). One small description type covers every figure of the
//! evaluation: lines, step CDFs, labelled points and grouped bars on linear
//! or log axes.

use plotters::prelude::*;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Line,
    /// A staircase through the points (CDFs).
    Step,
    Points,
    LinePoints,
    /// Dashed horizontal or sloped reference line.
    Dashed,
}

#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub mark: Mark,
    /// Text written next to each point (same length as `points`), if any.
    pub notes: Vec<String>,
    /// Palette index; by default the series' position.
    pub colour: Option<usize>,
    /// Vertical offset of the notes, pixels (negative: above the point).
    pub note_dy: i32,
    /// Every second note goes below its point instead (close points).
    pub alternate_notes: bool,
}

impl Series {
    pub fn new(label: impl Into<String>, mark: Mark, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.into(),
            points,
            mark,
            notes: Vec::new(),
            colour: None,
            note_dy: -18,
            alternate_notes: false,
        }
    }

    pub fn colour(mut self, i: usize) -> Series {
        self.colour = Some(i);
        self
    }
}

/// One bar group per category; one bar per series inside a group.
#[derive(Clone, Debug)]
pub struct Bars {
    pub categories: Vec<String>,
    /// (series label, one value per category)
    pub series: Vec<(String, Vec<f64>)>,
}

#[derive(Clone, Debug)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
    pub bars: Option<Bars>,
    /// Legend corner: true puts it at the lower right, else upper left.
    pub legend_low: bool,
    /// Labelled x positions on a log x axis (else only powers of ten are
    /// labelled, too few when the data spans under two decades).
    pub x_ticks: Option<Vec<f64>>,
}

impl Plot {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Plot {
        Plot {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_log: false,
            y_log: false,
            x_range: None,
            y_range: None,
            series: Vec::new(),
            bars: None,
            legend_low: false,
            x_ticks: None,
        }
    }
}

const W: u32 = 900;
const H: u32 = 560;

/// Colour-blind-safe palette (Okabe-Ito), then greys.
const COLOURS: [RGBColor; 9] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
    RGBColor(180, 180, 40),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Points of an empirical CDF of `values` (in %: y from 0 to 100).
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len().max(1) as f64;
    let mut out = Vec::with_capacity(v.len() + 1);
    if let Some(first) = v.first() {
        out.push((*first, 0.0));
    }
    for (i, x) in v.iter().enumerate() {
        out.push((*x, 100.0 * (i + 1) as f64 / n));
    }
    out
}

fn span(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in vals.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let (l, h) = (lo.log10().floor(), hi.log10().ceil());
        let h = if h <= l { l + 1.0 } else { h };
        (10f64.powf(l), 10f64.powf(h))
    } else {
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 1.0 };
        let lo = if lo >= 0.0 && lo - pad < 0.0 {
            0.0
        } else {
            lo - pad
        };
        (lo, hi + pad)
    }
}

/// Axis numbers without trailing zeros.
fn num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    let s = if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    };
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("cannot draw the figure: {e:?}")
}

/// Renders `p` to an SVG document.
pub fn svg(p: &Plot) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        match &p.bars {
            Some(b) => bars(&root, p, b)?,
            None => match (p.x_log, p.y_log) {
                (false, false) => xy(&root, p, false, false)?,
                (true, false) => xy(&root, p, true, false)?,
                (false, true) => xy(&root, p, false, true)?,
                (true, true) => xy(&root, p, true, true)?,
            },
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn xy(root: &Area<'_>, p: &Plot, xlog: bool, ylog: bool) -> Result<(), String> {
    let all = || p.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = p.x_range.unwrap_or_else(|| span(all().map(|q| q.0), xlog));
    let (y0, y1) = p.y_range.unwrap_or_else(|| span(all().map(|q| q.1), ylog));
    let mut b = ChartBuilder::on(root);
    b.caption(&p.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(78);
    // One generic body for the four axis kinds.
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .light_line_style(RGBColor(235, 235, 235))
                .x_label_formatter(&|v| num(*v))
                .y_label_formatter(&|v| num(*v))
                .draw()
                .map_err(err)?;
            let inside = |q: &(f64, f64)| {
                q.0.is_finite()
                    && q.1.is_finite()
                    && (!xlog || q.0 > 0.0)
                    && (!ylog || q.1 > 0.0)
                    && q.0 >= x0
                    && q.0 <= x1
                    && q.1 >= y0
                    && q.1 <= y1
            };
            for (i, s) in p.series.iter().enumerate() {
                let c = colour(s.colour.unwrap_or(i));
                let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(inside).collect();
                let line = match s.mark {
                    Mark::Step => {
                        let mut st = Vec::with_capacity(pts.len() * 2);
                        for (k, q) in pts.iter().enumerate() {
                            if k > 0 {
                                st.push((q.0, pts[k - 1].1));
                            }
                            st.push(*q);
                        }
                        st
                    }
                    _ => pts.clone(),
                };
                let anno = match s.mark {
                    Mark::Line | Mark::Step | Mark::LinePoints => chart
                        .draw_series(LineSeries::new(line, c.stroke_width(3)))
                        .map_err(err)?,
                    Mark::Dashed => chart
                        .draw_series(DashedLineSeries::new(line, 8, 6, c.stroke_width(2)))
                        .map_err(err)?,
                    Mark::Points => chart
                        .draw_series(pts.iter().map(|q| Circle::new(*q, 6, c.filled())))
                        .map_err(err)?,
                };
                let w = if s.mark == Mark::Dashed { 2 } else { 4 };
                anno.label(s.label.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(w))
                });
                if s.mark == Mark::LinePoints {
                    chart
                        .draw_series(pts.iter().map(|q| Circle::new(*q, 4, c.filled())))
                        .map_err(err)?;
                }
                if !s.notes.is_empty() {
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .zip(&s.notes)
                                .enumerate()
                                .filter(|(_, (q, _))| inside(q))
                                .map(|(k, (q, t))| {
                                    let dy = if s.alternate_notes && k % 2 == 1 {
                                        8
                                    } else {
                                        s.note_dy
                                    };
                                    EmptyElement::at(*q)
                                        + Text::new(
                                            t.clone(),
                                            (8, dy),
                                            ("sans-serif", 14).into_font(),
                                        )
                                }),
                        )
                        .map_err(err)?;
                }
            }
            if p.series.len() > 1 || p.series.iter().any(|s| !s.label.is_empty()) {
                chart
                    .configure_series_labels()
                    .position(if p.legend_low {
                        SeriesLabelPosition::LowerRight
                    } else {
                        SeriesLabelPosition::UpperLeft
                    })
                    .label_font(("sans-serif", 15))
                    .background_style(WHITE.mix(0.9))
                    .border_style(BLACK)
                    .draw()
                    .map_err(err)?;
            }
            Ok(())
        }};
    }
    match (xlog, ylog, &p.x_ticks) {
        (true, false, Some(t)) => body!(b
            .build_cartesian_2d((x0..x1).log_scale().with_key_points(t.clone()), y0..y1)
            .map_err(err)?),
        (true, true, Some(t)) => body!(b
            .build_cartesian_2d(
                (x0..x1).log_scale().with_key_points(t.clone()),
                (y0..y1).log_scale()
            )
            .map_err(err)?),
        (false, false, _) => body!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?),
        (true, false, _) => body!(b
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(err)?),
        (false, true, _) => body!(b
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(err)?),
        (true, true, _) => body!(b
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(err)?),
    }
}

fn bars(root: &Area<'_>, p: &Plot, b: &Bars) -> Result<(), String> {
    let n = b.categories.len().max(1);
    let k = b.series.len().max(1);
    let top = p.y_range.map(|r| r.1).unwrap_or_else(|| {
        b.series
            .iter()
            .flat_map(|s| s.1.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15
            + 1e-9
    });
    let cats = b.categories.clone();
    let mut chart = ChartBuilder::on(root)
        .caption(&p.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(78)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                cats.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    let w = 0.8 / k as f64;
    for (si, (label, vals)) in b.series.iter().enumerate() {
        let c = colour(si);
        chart
            // A value that was not measured (NaN) gets no bar, not a 0.
            .draw_series(
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(ci, v)| {
                        let x = ci as f64 - 0.4 + si as f64 * w;
                        Rectangle::new([(x, 0.0), (x + w * 0.92, v.max(0.0))], c.filled())
                    }),
            )
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_axis_labels_legend_and_data() {
        let mut p = Plot::new("Cold starts", "cold-start % per app", "apps (%)");
        p.series.push(Series::new(
            "fixed 10 min",
            Mark::Step,
            cdf(&[1.0, 5.0, 50.0, 100.0]),
        ));
        p.series.push(Series::new(
            "adaptive",
            Mark::Step,
            cdf(&[0.0, 1.0, 2.0, 3.0]),
        ));
        let s = svg(&p).expect("draws");
        assert!(s.starts_with("<svg"));
        for t in [
            "Cold starts",
            "cold-start % per app",
            "fixed 10 min",
            "adaptive",
        ] {
            assert!(s.contains(t), "{t} missing");
        }
        assert!(s.matches("<polyline").count() >= 2);
    }

    #[test]
    fn log_axes_and_bars_draw() {
        let mut p = Plot::new("t", "subscribers", "ms");
        p.x_log = true;
        p.y_log = true;
        p.series.push(Series::new(
            "a",
            Mark::LinePoints,
            vec![(100.0, 5.0), (6400.0, 80.0), (0.0, 1.0)],
        ));
        assert!(svg(&p).is_ok());
        let mut b = Plot::new("bars", "class", "load");
        b.bars = Some(Bars {
            categories: vec!["pi3".into(), "x86".into()],
            series: vec![
                ("before".into(), vec![2.0, 0.5]),
                ("after".into(), vec![1.0, 1.0]),
            ],
        });
        let s = svg(&b).expect("draws");
        assert!(s.contains("pi3") && s.contains("before"));
    }

    #[test]
    fn cdf_ends_at_100() {
        let c = cdf(&[3.0, 1.0, 2.0]);
        assert_eq!(c.first(), Some(&(1.0, 0.0)));
        assert_eq!(c.last(), Some(&(3.0, 100.0)));
    }
}
