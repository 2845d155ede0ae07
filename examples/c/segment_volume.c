/* The README's C example (scripts/test-bindings.sh compiles it and checks the README quotes it). */
#include <stdio.h>
#include "medsa.h"

int segment(const float *scan, size_t nx, size_t ny, size_t nz, unsigned char *labels) {
    medsa_model *m = NULL;
    if (medsa_model_open(".models/lite_medsam.safetensors",
                         "examples/models/litemedsam_gm_adapter.safetensors", "cpu", "f32", &m)) {
        fprintf(stderr, "medsa: %s\n", medsa_last_error());
        return -1;
    }
    medsa_status st = medsa_segment_volume(m, scan, nx, ny, nz,   /* scan: [nz][ny][nx] */
                                           "{\"box\": [20, 20, 16, 175, 210, 16]}",
                                           "{\"propagate\": true}", labels, nx * ny * nz);
    if (st != MEDSA_OK) fprintf(stderr, "medsa: %s\n", medsa_last_error());
    medsa_model_free(m);
    return st == MEDSA_OK ? 0 : -1;
}
