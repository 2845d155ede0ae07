/* The C ABI against a fixture: `test_medsa WEIGHTS DIR` where DIR holds the raw little-endian
 * float32 files tests/python/conftest.py exports from tests/fixtures/tiny/points.safetensors
 * (images, point_coords, point_labels, masks, iou_predictions, low_res_masks, plus shape.txt).
 * Checks the outputs against the PyTorch reference at the tolerance of the Rust tests, then the
 * error paths: every failure is a status code with a message, never a crash. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "medsa.h"

static int failures = 0;
#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fprintf(stderr, "\n");                                                              \
            failures++;                                                                         \
        }                                                                                       \
    } while (0)

static float *load(const char *dir, const char *name, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.f32", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    float *v = malloc(n * sizeof(float));
    size_t got = fread(v, sizeof(float), n, f);
    fclose(f);
    if (got != n) {
        fprintf(stderr, "%s: %zu of %zu values\n", path, got, n);
        exit(2);
    }
    return v;
}

/* |got - want| <= 1e-4 |want| + 1e-4 rms(want), as tests/cli.rs compares `forward`. */
static int close_to(const float *got, const float *want, size_t n, const char *what) {
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)want[i] * want[i];
    double atol = 1e-4 * sqrt(ss / (double)n);
    for (size_t i = 0; i < n; i++) {
        if (!(fabs(got[i] - want[i]) <= 1e-4 * fabs(want[i]) + atol)) {
            fprintf(stderr, "%s[%zu]: got %g, want %g\n", what, i, got[i], want[i]);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s WEIGHTS.safetensors FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    const char *weights = argv[1], *dir = argv[2];
    /* shape.txt: B H W N (points per image) OH OW (original size) IH IW (input size) M LH LW */
    char path[4096];
    snprintf(path, sizeof path, "%s/shape.txt", dir);
    FILE *sf = fopen(path, "r");
    size_t B, H, W, N, OH, OW, IH, IW, M, LH, LW;
    if (!sf || fscanf(sf, "%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu", &B, &H, &W, &N, &OH, &OW,
                      &IH, &IW, &M, &LH, &LW) != 11) {
        fprintf(stderr, "%s: expected 11 sizes\n", path);
        return 2;
    }
    fclose(sf);

    CHECK(medsa_abi_version() == MEDSA_ABI_VERSION, "abi %u", medsa_abi_version());
    CHECK(strlen(medsa_version()) > 0, "empty version");

    medsa_model *model = NULL;
    medsa_status st = medsa_model_open(weights, NULL, "cpu", "f32", &model);
    CHECK(st == MEDSA_OK && model, "open: %d %s", st, medsa_last_error());
    if (!model) return 1;

    size_t mh = 0, mw = 0;
    CHECK(medsa_model_image_size(model, &mh, &mw) == MEDSA_OK && mh == H && mw == W,
          "image size %zux%zu", mh, mw);
    size_t len = 0;
    CHECK(medsa_model_info(model, NULL, 0, &len) == MEDSA_OK && len > 2, "info len %zu", len);
    char *info = malloc(len + 1);
    CHECK(medsa_model_info(model, info, len + 1, &len) == MEDSA_OK, "info: %s",
          medsa_last_error());
    CHECK(strstr(info, "\"image_size\"") != NULL, "info: %s", info);
    char small[4];
    CHECK(medsa_model_info(model, small, sizeof small, &len) == MEDSA_ERR_ARGUMENT,
          "a short buffer must be refused");
    free(info);

    float *images = load(dir, "images", B * 3 * H * W);
    float *coords = load(dir, "point_coords", B * N * 2);
    float *labels = load(dir, "point_labels", B * N);
    float *want_masks = load(dir, "masks", B * M * OH * OW);
    float *want_iou = load(dir, "iou_predictions", B * M);
    float *want_low = load(dir, "low_res_masks", B * M * LH * LW);

    medsa_embeddings *emb = NULL;
    st = medsa_embed(model, images, B, H, W, &emb);
    CHECK(st == MEDSA_OK && emb, "embed: %d %s", st, medsa_last_error());
    if (!emb) return 1;
    size_t shape[4];
    CHECK(medsa_embeddings_shape(emb, shape) == MEDSA_OK && shape[0] == B, "emb shape");
    size_t ne = shape[0] * shape[1] * shape[2] * shape[3];
    float *e = malloc(ne * sizeof(float));
    CHECK(medsa_embeddings_copy(model, emb, e, ne) == MEDSA_OK, "copy: %s", medsa_last_error());
    CHECK(medsa_embeddings_copy(model, emb, e, ne - 1) == MEDSA_ERR_ARGUMENT, "short copy");
    free(e);

    for (size_t b = 0; b < B; b++) {
        medsa_prompt p = {0};
        p.points = coords + b * N * 2;
        p.point_labels = labels + b * N;
        p.num_points = N;
        p.multimask = M > 1;
        p.input_height = IH;
        p.input_width = IW;
        p.output_height = OH;
        p.output_width = OW;
        medsa_masks *masks = NULL;
        st = medsa_decode(model, emb, b, &p, &masks);
        CHECK(st == MEDSA_OK && masks, "decode %zu: %d %s", b, st, medsa_last_error());
        if (!masks) continue;
        size_t c, h, w, lh, lw;
        CHECK(medsa_masks_shape(masks, &c, &h, &w, &lh, &lw) == MEDSA_OK && c == M && h == OH &&
                  w == OW && lh == LH && lw == LW,
              "masks shape %zu %zu %zu %zu %zu", c, h, w, lh, lw);
        CHECK(close_to(medsa_masks_logits(masks), want_masks + b * M * OH * OW, M * OH * OW,
                       "masks"),
              "image %zu masks differ from the reference", b);
        CHECK(close_to(medsa_masks_iou(masks), want_iou + b * M, M, "iou"),
              "image %zu iou differs", b);
        CHECK(close_to(medsa_masks_low_res(masks), want_low + b * M * LH * LW, M * LH * LW,
                       "low_res"),
              "image %zu low-res logits differ", b);
        medsa_masks_free(masks);
    }

    /* Error paths: codes and messages, no crash. */
    medsa_model *none = NULL;
    st = medsa_model_open("/nonexistent/model.safetensors", NULL, NULL, NULL, &none);
    CHECK(st == MEDSA_ERR_ENGINE && none == NULL, "missing file: %d", st);
    CHECK(strstr(medsa_last_error(), "/nonexistent/model.safetensors") != NULL, "message: %s",
          medsa_last_error());
    st = medsa_model_open(weights, NULL, "tpu", NULL, &none);
    CHECK(st == MEDSA_ERR_ENGINE && strstr(medsa_last_error(), "tpu"), "bad device: %d %s", st,
          medsa_last_error());
    CHECK(medsa_model_open(NULL, NULL, NULL, NULL, &none) == MEDSA_ERR_ARGUMENT, "NULL path");
    medsa_embeddings *emb2 = (medsa_embeddings *)&failures;
    CHECK(medsa_embed(model, NULL, 1, H, W, &emb2) == MEDSA_ERR_ARGUMENT, "NULL images");
    CHECK(emb2 == NULL, "a failed call must clear its out handle");
    st = medsa_embed(model, images, 1, H, W + 1, &emb2);
    CHECK(st == MEDSA_ERR_ENGINE, "wrong size: %d %s", st, medsa_last_error());
    medsa_masks *m2 = NULL;
    medsa_prompt none_p = {0};
    CHECK(medsa_decode(model, NULL, 0, &none_p, &m2) == MEDSA_ERR_ARGUMENT, "NULL emb");

    /* A volume: labels come back for every voxel, and a box outside is an engine error. */
    size_t nx = 40, ny = 30, nz = 4, nv = nx * ny * nz;
    float *vol = malloc(nv * sizeof(float));
    for (size_t i = 0; i < nv; i++) vol[i] = (float)((i * 7919) % 255);
    unsigned char *lab = malloc(nv);
    st = medsa_segment_volume(model, vol, nx, ny, nz, "{\"box\": [5, 5, 1, 30, 20, 2]}",
                              "{\"intensity\": \"window:0,255\"}", lab, nv);
    CHECK(st == MEDSA_OK, "segment_volume: %d %s", st, medsa_last_error());
    int bad = 0;
    for (size_t i = 0; i < nv; i++) bad += lab[i] > 1;
    for (size_t i = 0; i < nx * ny; i++) bad += lab[i] != 0; /* slice 0 is not prompted */
    CHECK(bad == 0, "%d voxels with an unexpected label", bad);
    st = medsa_segment_volume(model, vol, nx, ny, nz, "{\"box\": [5, 5, 1, 300, 20, 2]}", NULL,
                              lab, nv);
    CHECK(st == MEDSA_ERR_ENGINE && strstr(medsa_last_error(), "box"), "outside: %d %s", st,
          medsa_last_error());
    st = medsa_segment_volume(model, vol, nx, ny, nz, "{\"box\": [5, 5, 1, 30, 20, 2]}",
                              "{\"propogate\": true}", lab, nv);
    CHECK(st == MEDSA_ERR_ENGINE && strstr(medsa_last_error(), "propogate"), "option: %s",
          medsa_last_error());
    CHECK(medsa_segment_volume(model, vol, nx, ny, nz, "{}", NULL, lab, nv - 1) ==
              MEDSA_ERR_ARGUMENT,
          "short labels buffer");

    medsa_embeddings_free(emb);
    medsa_model_free(model);
    medsa_model_free(NULL);
    free(vol);
    free(lab);
    free(images);
    free(coords);
    free(labels);
    free(want_masks);
    free(want_iou);
    free(want_low);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C ABI: all checks passed (%zu images decoded against the reference)\n", B);
    return 0;
}
