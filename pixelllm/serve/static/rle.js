"use strict";

/**
 * Decode a COCO RLE mask ({size: [H, W], counts: str}, the compressed string of pycocotools)
 * into a Uint8Array of H * W pixels in row-major order (1 inside the mask).
 *
 * The string holds run lengths (alternately 0s and 1s, starting with 0s) over the pixels in
 * column-major order; each is written in 5-bit groups (chars from 48), low bits first, the 0x20 bit
 * saying "more groups follow" and, in the last group, 0x10 the sign; from the third run on, a run
 * is stored as its difference to the run two before (pycocotools' rleToString).
 */
function decodeRle(rle) {
  const [height, width] = rle.size;
  const runs = [];
  const text = rle.counts;
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let group = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      value += (c & 0x1f) * 2 ** (5 * group); // multiplication: shifts past 31 bits wrap in JS
      more = (c & 0x20) !== 0;
      p += 1;
      group += 1;
      if (!more && (c & 0x10)) value -= 2 ** (5 * group);
    }
    if (runs.length > 2) value += runs[runs.length - 2];
    runs.push(value);
  }
  const mask = new Uint8Array(height * width);
  let index = 0;
  runs.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let k = index; k < index + run; k++) {
        mask[(k % height) * width + Math.floor(k / height)] = 1;
      }
    }
    index += run;
  });
  return mask;
}
