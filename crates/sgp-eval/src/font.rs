//! Text on pictures with the public-domain 8×8 bitmap font of `font8x8`: no system fonts,
//! no freetype, identical output everywhere.

use image::{Rgb, RgbImage};

/// Glyph size in pixels (at scale 1).
pub(crate) const GLYPH: u32 = 8;

fn glyph(c: char) -> [u8; 8] {
    let i = c as usize;
    if i < 128 {
        font8x8::legacy::BASIC_LEGACY[i]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

/// Draw `text` with its top-left corner at (x, y), on a box of `background` if given (else
/// only the glyph pixels are painted); returns the x after it.
pub(crate) fn draw_text(
    img: &mut RgbImage,
    x: u32,
    y: u32,
    text: &str,
    colour: Rgb<u8>,
    background: Option<Rgb<u8>>,
    scale: u32,
) -> u32 {
    let s = scale.max(1);
    let mut cx = x;
    for c in text.chars() {
        let rows = glyph(c);
        for (gy, bits) in rows.iter().enumerate() {
            for gx in 0..8u32 {
                // Bit 0 is the leftmost pixel.
                let paint = if (bits >> gx) & 1 == 1 {
                    Some(colour)
                } else {
                    background
                };
                let Some(paint) = paint else { continue };
                for dy in 0..s {
                    for dx in 0..s {
                        let (px, py) = (cx + gx * s + dx, y + gy as u32 * s + dy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, paint);
                        }
                    }
                }
            }
        }
        cx += GLYPH * s;
    }
    cx
}

/// Draw `text` rotated 90° clockwise (reading top to bottom), transparent background.
pub(crate) fn draw_text_vertical(img: &mut RgbImage, x: u32, y: u32, text: &str, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (gy, bits) in rows.iter().enumerate() {
            for gx in 0..8u32 {
                if (bits >> gx) & 1 == 1 {
                    // Rotating clockwise: glyph column -> picture row, glyph row -> column from the right.
                    let px = x + (GLYPH - 1 - gy as u32);
                    let py = y + i as u32 * GLYPH + gx;
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, colour);
                    }
                }
            }
        }
    }
}
