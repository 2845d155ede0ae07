/*
 * medsa.h: the C ABI of the medsa engine (Medical SAM Adapter: SAM, LiteMedSAM and Med-SA
 * adapters on the CPU and NVIDIA GPUs). Link with -lmedsa_c (target/release/libmedsa_c.so,
 * built by `cargo build --release -p medsa-c`).
 *
 * Conventions
 *  - Every function that can fail returns a medsa_status; on failure, medsa_last_error() gives
 *    the engine's message (naming the file, field or argument and what was expected). No call
 *    unwinds or aborts across this boundary: an internal panic becomes MEDSA_ERR_INTERNAL.
 *  - Handles (medsa_model, medsa_embeddings, medsa_masks) are opaque; each has its _free
 *    function, which accepts NULL. Handles may be used from any thread, one call at a time per
 *    model; an embeddings handle is decoded only by the model that made it (else an error).
 *  - Arrays are row-major float32 (C order). Images are preprocessed model inputs
 *    [batch][3][H][W]; prompt coordinates are model-input pixels (x = column, y = row).
 *  - Volumes for medsa_segment_volume are raw intensities x fastest ([nz][ny][nx], the order
 *    of a NIfTI file's array), with prompts in voxel indices, as `medsa-engine segment`.
 *  - The ABI is versioned by MEDSA_ABI_VERSION; medsa_abi_version() reports the library's.
 */
#ifndef MEDSA_H
#define MEDSA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MEDSA_ABI_VERSION 1

typedef enum medsa_status {
    MEDSA_OK = 0,
    /* A NULL pointer, a zero size or a buffer too small for the result. */
    MEDSA_ERR_ARGUMENT = 1,
    /* The engine refused the input or failed: a missing or corrupt file, a wrong shape, a
     * prompt outside the image, a device that cannot be opened. */
    MEDSA_ERR_ENGINE = 2,
    /* A bug in medsa (a caught panic); the message says where. */
    MEDSA_ERR_INTERNAL = 3
} medsa_status;

typedef struct medsa_model medsa_model;
typedef struct medsa_embeddings medsa_embeddings;
typedef struct medsa_masks medsa_masks;

/* The engine's version, e.g. "0.1.0" (static storage). */
const char *medsa_version(void);
/* MEDSA_ABI_VERSION of the library. */
uint32_t medsa_abi_version(void);
/* The message of the last failed call on this thread ("" if none); valid until the next
 * medsa call on this thread. */
const char *medsa_last_error(void);

/* Loads `checkpoint` (.safetensors) with an optional `adapter` (NULL for none) onto `device`
 * ("cpu", "cuda", "cuda:N"; NULL means "cpu") at `precision` ("f32" or "bf16"; NULL means
 * "f32"). */
medsa_status medsa_model_open(const char *checkpoint, const char *adapter, const char *device,
                              const char *precision, medsa_model **out);
void medsa_model_free(medsa_model *model);
/* The model input size. */
medsa_status medsa_model_image_size(const medsa_model *model, size_t *height, size_t *width);
/* The model's description as a JSON object, NUL-terminated into buf[cap]; *len gets the
 * length without the NUL. With buf NULL or cap too small, only *len is set (and
 * MEDSA_ERR_ARGUMENT returned if buf was given). */
medsa_status medsa_model_info(const medsa_model *model, char *buf, size_t cap, size_t *len);

/* Encodes `batch` preprocessed images [batch][3][height][width]. */
medsa_status medsa_embed(const medsa_model *model, const float *images, size_t batch,
                         size_t height, size_t width, medsa_embeddings **out);
/* [batch, channels, h, w]. */
medsa_status medsa_embeddings_shape(const medsa_embeddings *emb, size_t shape[4]);
/* Copies the embeddings (len = product of the shape) to host memory. */
medsa_status medsa_embeddings_copy(const medsa_model *model, const medsa_embeddings *emb,
                                   float *out, size_t len);
void medsa_embeddings_free(medsa_embeddings *emb);

/* Prompts for one image of an embeddings batch. Pointers may be NULL when unused. */
typedef struct medsa_prompt {
    const float *points;       /* num_points (x, y) pairs, model-input pixels */
    const float *point_labels; /* num_points labels: 1 foreground, 0 background, -1 ignored */
    size_t num_points;
    const float *box;          /* (x0, y0, x1, y1), or NULL */
    const float *mask_input;   /* [1][4h][4w] low-res logits of a previous decode, or NULL */
    int multimask;             /* non-zero: SAM's three masks instead of one */
    size_t input_height;       /* the image after resizing, before padding (0: whole input) */
    size_t input_width;
    size_t output_height;      /* the masks' size (0: the input size) */
    size_t output_width;
} medsa_prompt;

/* Decodes `prompt` against image `index` of `emb`. */
medsa_status medsa_decode(const medsa_model *model, const medsa_embeddings *emb, size_t index,
                          const medsa_prompt *prompt, medsa_masks **out);
/* count masks of height x width logits, and low-res logits of low_height x low_width. */
medsa_status medsa_masks_shape(const medsa_masks *masks, size_t *count, size_t *height,
                               size_t *width, size_t *low_height, size_t *low_width);
/* [count][height][width] mask logits (threshold at 0); valid until medsa_masks_free. */
const float *medsa_masks_logits(const medsa_masks *masks);
/* [count] predicted IoU. */
const float *medsa_masks_iou(const medsa_masks *masks);
/* [count][low_height][low_width] low-res logits (a next prompt's mask_input). */
const float *medsa_masks_low_res(const medsa_masks *masks);
void medsa_masks_free(medsa_masks *masks);

/* Segments a volume as `medsa-engine segment` does: `data` [nz][ny][nx] raw intensities;
 * `prompts_json` one object or a list ({"box": [x0,y0,z0,x1,y1,z1]}, {"points": [[x,y,z,label]]},
 * as in a manifest); `options_json` NULL or {"propagate": true, "intensity": "ct", "chunk": 8,
 * "multimask": false, "volume_preset": "litemedsam", ...}. Writes labels (object k = k + 1)
 * into labels[nx * ny * nz]. */
medsa_status medsa_segment_volume(const medsa_model *model, const float *data, size_t nx,
                                  size_t ny, size_t nz, const char *prompts_json,
                                  const char *options_json, uint8_t *labels, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* MEDSA_H */
