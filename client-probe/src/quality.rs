//! Call-quality estimates from a path's figures: the ITU-T G.107 E-model's transmission
//! rating R for a voice call, and the MOS it maps to, as the precall tests of the big
//! communications platforms report them.
//!
//! Assumptions, stated so the figure can be judged: a G.711 call with packet-loss concealment
//! (Ie = 0, Bpl = 25.1, ITU-T G.113 Appendix I), random loss (BurstR = 1), 20 ms packets and
//! a jitter buffer of twice the measured jitter, echo well cancelled (the default talker and
//! listener echo terms, which only the delay term below changes noticeably), and the other end
//! as far from the relay as the probe is: a call's one-way delay then equals the measured round
//! trip (probe to relay and back, or through the relay and back), so the mouth-to-ear delay is
//! that round trip, plus the jitter buffer and a packet's time.

/// The default transmission rating of G.107 with every parameter at its default: the best a
/// G.711 call gets.
const R_DEFAULT: f64 = 93.2;
/// G.711's equipment impairment and its robustness to loss with concealment (G.113).
const IE: f64 = 0.0;
const BPL: f64 = 25.1;
/// A packet's duration, ms.
const PACKET_MS: f64 = 20.0;

/// The estimate for one path.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Voice {
    /// G.107's R, 0 to 100.
    pub r: f64,
    /// Mean opinion score, 1 to 4.5 (4.41 at best for G.711).
    pub mos: f64,
    /// G.109's category of R: `best`, `high`, `medium`, `low`, `poor`.
    pub rating: &'static str,
}

/// The estimate from a round trip and jitter (ms) and a loss ratio (0 to 1).
pub fn voice(rtt_ms: f64, jitter_ms: f64, loss: f64) -> Voice {
    let ta = rtt_ms.max(0.0) + 2.0 * jitter_ms.max(0.0) + PACKET_MS;
    let ppl = (loss.clamp(0.0, 1.0)) * 100.0;
    let ie_eff = IE + (95.0 - IE) * ppl / (ppl + BPL);
    let r = (R_DEFAULT - idd(ta) - ie_eff).clamp(0.0, 100.0);
    Voice {
        r,
        mos: mos(r),
        rating: match r {
            r if r >= 90.0 => "best",
            r if r >= 80.0 => "high",
            r if r >= 70.0 => "medium",
            r if r >= 60.0 => "low",
            _ => "poor",
        },
    }
}

/// G.107's impairment of an absolute mouth-to-ear delay `ta` (ms), Idd.
fn idd(ta: f64) -> f64 {
    if ta <= 100.0 {
        return 0.0;
    }
    let x = (ta / 100.0).log2();
    25.0 * ((1.0 + x.powi(6)).powf(1.0 / 6.0) - 3.0 * (1.0 + (x / 3.0).powi(6)).powf(1.0 / 6.0)
        + 2.0)
}

/// G.107 Annex B: MOS from R.
fn mos(r: f64) -> f64 {
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() < 0.01
    }

    #[test]
    fn a_perfect_path_gets_the_g711_ceiling() {
        let v = voice(0.0, 0.0, 0.0);
        assert!(near(v.r, 93.2) && near(v.mos, 4.41), "{v:?}");
        assert_eq!(v.rating, "best");
    }

    #[test]
    fn delay_and_loss_lower_the_score_as_g107_says() {
        // 300 ms mouth-to-ear: Idd 14.76 (G.107 formula by hand), R 78.44.
        let v = voice(300.0 - PACKET_MS, 0.0, 0.0);
        assert!(near(v.r, 78.44), "{v:?}");
        assert_eq!(v.rating, "medium");
        // 5% random loss with concealment: Ie,eff = 95 x 5 / 30.1 = 15.78.
        let v = voice(0.0, 0.0, 0.05);
        assert!(near(v.r, 93.2 - 15.78), "{v:?}");
        assert!(near(v.mos, 3.92), "{v:?}");
        // Everything lost: the worst score.
        assert_eq!(voice(10.0, 1.0, 1.0).rating, "poor");
        // Jitter counts twice, through the buffer.
        assert!(voice(100.0, 60.0, 0.0).r < voice(200.0, 0.0, 0.0).r);
    }
}
