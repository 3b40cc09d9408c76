//! Forecast rules: a least-squares line through a property's recent readings, extended to
//! the rule's threshold. The rule raises when the line crosses the threshold within its
//! horizon, and its alert ends with what happened: `breached` (the value crossed),
//! `averted` (the trend turned) or `stale` (the asset went OFFLINE).
//!
//! The readings of the window live in the twin (at most [`MAX_POINTS`] per rule and twin),
//! so a forecast survives a restore and a failover. The window is the newest points within
//! `window` of the newest reading, whatever order the readings came in: a late reading
//! within the window joins it, one older than it does not.

use super::Op;

/// Most points a forecast window keeps (the newest).
pub const MAX_POINTS: usize = 24;

/// A forecast rule's settings, in milliseconds of event time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForecastSpec {
    /// Raise when the predicted crossing is at most this far ahead.
    pub horizon: i64,
    /// Once raised, clear (averted) only when the predicted crossing is further than this
    /// (hysteresis on the time to breach).
    pub clear_horizon: i64,
    /// The readings the line is fitted through: those within this of the newest.
    pub window: i64,
    /// Fewest readings to fit.
    pub min_samples: usize,
    /// Shortest time the readings must span.
    pub min_span: i64,
    /// Lowest fit quality (R²) to believe the line.
    pub min_fit: f64,
}

/// A predicted crossing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    /// When the line crosses the threshold (event time, ms).
    pub breach_at: i64,
    /// From the newest reading to the crossing, ms.
    pub time_to_breach: i64,
    /// The line's slope, per minute.
    pub slope_per_minute: f64,
    /// R² of the fit.
    pub fit: f64,
    /// The line's value at the newest reading.
    pub value: f64,
}

/// What the window says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prediction {
    /// Too few readings, too short a span, or too poor a fit to say anything.
    Unknown,
    /// The newest reading is past the threshold already.
    Breached,
    /// The line does not cross the threshold ahead (flat, or moving away).
    Clear,
    /// The line crosses it ahead.
    Crossing(Forecast),
}

/// The width of a window's buckets, ms: a window of `window` ms spans at most
/// [`MAX_POINTS`] of them, whatever the readings' rate.
pub fn bucket(window: i64) -> i64 {
    let n = MAX_POINTS as i64 - 1;
    ((window + n - 1) / n).max(1)
}

/// Adds reading `(at, value)` to `points` (a window of `window` ms). Returns whether the
/// window changed.
///
/// The window keeps one point per bucket of [`bucket`]`(window)` ms of event time (buckets
/// aligned to the epoch): the newest reading of the bucket, the larger value at equal
/// times. So however often the device reports, the points spread over the whole window,
/// and the window does not depend on the order the readings came in.
pub fn observe(points: &mut Vec<(i64, f64)>, at: i64, value: f64, window: i64) -> bool {
    if !value.is_finite() {
        return false;
    }
    let newest = points.last().map_or(at, |p| p.0.max(at));
    let floor = newest.saturating_sub(window);
    if at < floor {
        return false;
    }
    let width = bucket(window);
    let of = |t: i64| t.div_euclid(width);
    match points.binary_search_by_key(&of(at), |p| of(p.0)) {
        Ok(i) => {
            let (t, v) = points[i];
            if (at, value) <= (t, v) {
                return false;
            }
            points[i] = (at, value);
        }
        Err(i) => points.insert(i, (at, value)),
    }
    let stale = points.iter().take_while(|p| p.0 < floor).count();
    let excess = points.len().saturating_sub(MAX_POINTS);
    points.drain(..stale.max(excess));
    true
}

/// Fits the line through `points` and extends it to `property op threshold`.
pub fn predict(points: &[(i64, f64)], spec: &ForecastSpec, op: Op, threshold: f64) -> Prediction {
    let Some(&(newest, last)) = points.last() else {
        return Prediction::Unknown;
    };
    if op.holds(last, threshold) {
        return Prediction::Breached;
    }
    let n = points.len();
    if n < spec.min_samples.max(2) || newest - points[0].0 < spec.min_span {
        return Prediction::Unknown;
    }
    // Minutes before the newest reading, so the numbers stay small.
    let t = |p: &(i64, f64)| (p.0 - newest) as f64 / 60_000.0;
    let (mean_t, mean_v) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + t(p), b + p.1));
    let (mean_t, mean_v) = (mean_t / n as f64, mean_v / n as f64);
    let (mut stt, mut stv, mut svv) = (0.0, 0.0, 0.0);
    for p in points {
        let (dt, dv) = (t(p) - mean_t, p.1 - mean_v);
        stt += dt * dt;
        stv += dt * dv;
        svv += dv * dv;
    }
    if stt == 0.0 || svv == 0.0 {
        return Prediction::Clear; // one instant, or a flat series
    }
    let slope = stv / stt;
    let fit = (stv * stv) / (stt * svv);
    if fit < spec.min_fit {
        return Prediction::Unknown;
    }
    let value = mean_v - slope * mean_t;
    let toward = match op {
        Op::Lt | Op::Le => slope < 0.0,
        Op::Gt | Op::Ge => slope > 0.0,
    };
    if !toward {
        return Prediction::Clear;
    }
    let minutes = (threshold - value) / slope;
    if !minutes.is_finite() || minutes < 0.0 || minutes > 1e9 {
        return Prediction::Clear;
    }
    let time_to_breach = (minutes * 60_000.0).round() as i64;
    Prediction::Crossing(Forecast {
        breach_at: newest.saturating_add(time_to_breach),
        time_to_breach,
        slope_per_minute: slope,
        fit,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn spec() -> ForecastSpec {
        ForecastSpec {
            horizon: 40 * MINUTE,
            clear_horizon: 50 * MINUTE,
            window: 15 * MINUTE,
            min_samples: 5,
            min_span: 5 * MINUTE,
            min_fit: 0.8,
        }
    }

    #[test]
    fn the_window_is_the_same_whatever_the_order() {
        let readings: Vec<(i64, f64)> =
            (0..60).map(|i| (i * 30_000, (i * 7 % 13) as f64)).collect();
        let mut forward = Vec::new();
        for (t, v) in &readings {
            observe(&mut forward, *t, *v, 15 * MINUTE);
        }
        let mut backward = Vec::new();
        for (t, v) in readings.iter().rev() {
            observe(&mut backward, *t, *v, 15 * MINUTE);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), MAX_POINTS);
        assert_eq!(forward.last().unwrap().0, 59 * 30_000);
    }

    #[test]
    fn a_drain_is_predicted_to_cross_when_it_will() {
        // 1 %/min from 60 %: 15 % at minute 45.
        let mut points = Vec::new();
        for m in 0..10 {
            observe(&mut points, m * MINUTE, 60.0 - m as f64, 15 * MINUTE);
        }
        let Prediction::Crossing(f) = predict(&points, &spec(), Op::Lt, 15.0) else {
            panic!("a crossing");
        };
        assert_eq!(f.breach_at, 45 * MINUTE);
        assert!((f.slope_per_minute + 1.0).abs() < 1e-9 && f.fit > 0.999);
    }

    #[test]
    fn flat_rising_short_and_noisy_series_predict_no_crossing() {
        let series = |values: &[f64]| {
            let mut points = Vec::new();
            for (m, v) in values.iter().enumerate() {
                observe(&mut points, m as i64 * MINUTE, *v, 15 * MINUTE);
            }
            predict(&points, &spec(), Op::Lt, 15.0)
        };
        assert_eq!(series(&[60.0; 10]), Prediction::Clear);
        assert_eq!(
            series(&[50.0, 51.0, 52.0, 53.0, 54.0, 55.0]),
            Prediction::Clear
        );
        assert_eq!(series(&[60.0, 59.0, 58.0]), Prediction::Unknown);
        // One spike in a flat series: the fit is too poor to believe.
        let mut spike = [60.0; 10];
        spike[9] = 30.0;
        assert_eq!(series(&spike), Prediction::Unknown);
        assert_eq!(
            series(&[60.0, 50.0, 40.0, 30.0, 20.0, 10.0]),
            Prediction::Breached
        );
    }
}
