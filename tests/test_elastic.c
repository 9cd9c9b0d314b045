/* test_elastic.c: the "elastic" suite: a replicated module remapped to another cohort
   (kdp_elastic_remap, src/train/elastic.c): a kept peer's rows, column blocks and own tensors
   land where its new index says, a new peer's entries are a fresh module's, and the identity
   map copies everything. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "kdpeers/train.h"
#include "testutil.h"

static kdp_cohort *make(kdp_method m, size_t P, const size_t *dims, size_t fusion, uint64_t seed) {
  kdp_kd_spec s;
  memset(&s, 0, sizeof s);
  s.method = m;
  s.P = P;
  s.C = 5;
  s.leader = -1;
  s.fusion_dim = fusion;
  for (size_t j = 0; j < P; j++) s.dims[j] = dims[j];
  kdp_cohort *c = NULL;
  kdp_error err;
  ck_assert_msg(kdp_cohort_create(&c, &s, 4, &err) == 0, "%s", err.msg);
  kdp_rng r;
  kdp_rng_seed(&r, seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(c, &r);
  return c;
}

static const kdp_kd_tensor *tensor(const kdp_cohort *c, const char *name) {
  for (size_t i = 0;; i++) {
    const kdp_kd_tensor *t = kdp_cohort_module_tensor(c, i);
    if (!t || strcmp(t->name, name) == 0) return t;
  }
}

/* distinct values in the old module, so a misplaced entry shows */
static void number(kdp_cohort *c) {
  float *p = kdp_cohort_module_params(c), *b = kdp_cohort_module_buffers(c);
  for (size_t k = 0; k < kdp_cohort_module_n_params(c); k++) p[k] = 1000.0f + (float)k;
  for (size_t k = 0; k < kdp_cohort_module_n_buffers(c); k++) b[k] = -1000.0f - (float)k;
}

static size_t feat_off(const size_t *dims, size_t j) {
  size_t o = 0;
  for (size_t i = 0; i < j; i++) o += dims[i];
  return o;
}

/* the gate (rows: one per peer, columns: d_j per peer) after a remap by map */
static void check_gate(size_t oP, const size_t *od, size_t nP, const size_t *nd, const int *map) {
  kdp_cohort *oc = make(KDP_METHOD_ONE, oP, od, 0, 7), *nc = make(KDP_METHOD_ONE, nP, nd, 0, 9),
             *fresh = make(KDP_METHOD_ONE, nP, nd, 0, 9);
  number(oc);
  char log[512];
  size_t kept = kdp_elastic_remap(oc, kdp_cohort_module_params(oc), nc,
                                  kdp_cohort_module_params(nc), map, 0, log, sizeof log);
  kdp_elastic_remap(oc, kdp_cohort_module_buffers(oc), nc, kdp_cohort_module_buffers(nc), map, 1,
                    NULL, 0);
  const kdp_kd_tensor *ow = tensor(oc, "gate.weight"), *nw = tensor(nc, "gate.weight"),
                      *ob = tensor(oc, "gate.bias"), *nb = tensor(nc, "gate.bias");
  ck_assert_ptr_nonnull(nw);
  const float *op = kdp_cohort_module_params(oc), *np = kdp_cohort_module_params(nc),
              *fp = kdp_cohort_module_params(fresh);
  size_t oD = feat_off(od, oP), nD = feat_off(nd, nP), want = 0;
  for (size_t r = 0; r < nP; r++) {
    for (size_t j = 0; j < nP; j++)
      for (size_t c = 0; c < nd[j]; c++) {
        size_t at = nw->off + r * nD + feat_off(nd, j) + c;
        if (map[r] >= 0 && map[j] >= 0) {
          float o = op[ow->off + (size_t)map[r] * oD + feat_off(od, (size_t)map[j]) + c];
          ck_assert_msg(np[at] == o, "gate.weight[%zu][block %zu + %zu]: %g, old %g", r, j, c,
                        np[at], o);
          want++;
        } else {
          ck_assert_msg(np[at] == fp[at], "gate.weight[%zu][block %zu]: not a fresh value", r, j);
        }
      }
    float b = np[nb->off + r];
    ck_assert(map[r] >= 0 ? b == op[ob->off + (size_t)map[r]] : b == fp[nb->off + r]);
    if (map[r] >= 0) want++;
    /* the batchnorm's running mean and var: one entry per peer */
    const float *obuf = kdp_cohort_module_buffers(oc), *nbuf = kdp_cohort_module_buffers(nc),
                *fbuf = kdp_cohort_module_buffers(fresh);
    for (size_t q = 0; q < 2; q++)
      ck_assert(map[r] >= 0 ? nbuf[q * nP + r] == obuf[q * oP + (size_t)map[r]]
                            : nbuf[q * nP + r] == fbuf[q * nP + r]);
  }
  /* gate_bn.weight and gate_bn.bias: one entry per peer */
  for (size_t r = 0; r < nP; r++) want += map[r] >= 0 ? 2 : 0;
  ck_assert_uint_eq(kept, want);
  ck_assert_msg(strstr(log, "gate.weight") != NULL, "log: %s", log);
  kdp_cohort_free(oc);
  kdp_cohort_free(nc);
  kdp_cohort_free(fresh);
}

START_TEST(test_one_shrink) {
  /* 3 -> 2 keeping peers 0 and 2 (heterogeneous feature dims) */
  size_t od[] = {4, 6, 5}, nd[] = {4, 5};
  int map[] = {0, 2};
  check_gate(3, od, 2, nd, map);
}
END_TEST

START_TEST(test_one_shrink_reordered) {
  size_t od[] = {4, 6, 5}, nd[] = {5, 6};
  int map[] = {2, 1};
  check_gate(3, od, 2, nd, map);
}
END_TEST

START_TEST(test_one_grow) {
  /* 2 -> 3: the new peer's row and column block are a fresh gate's */
  size_t od[] = {4, 6}, nd[] = {4, 6, 3};
  int map[] = {0, 1, -1};
  check_gate(2, od, 3, nd, map);
}
END_TEST

START_TEST(test_identity) {
  size_t d[] = {4, 6, 5};
  int map[] = {0, 1, 2};
  kdp_method ms[] = {KDP_METHOD_ONE, KDP_METHOD_FFL, KDP_METHOD_OKDDIP};
  for (size_t m = 0; m < 3; m++) {
    kdp_cohort *oc = make(ms[m], 3, d, 8, 7), *nc = make(ms[m], 3, d, 8, 9);
    number(oc);
    size_t n = kdp_cohort_module_n_params(oc);
    ck_assert_uint_eq(kdp_elastic_remap(oc, kdp_cohort_module_params(oc), nc,
                                        kdp_cohort_module_params(nc), map, 0, NULL, 0),
                      n);
    ck_assert(memcmp(kdp_cohort_module_params(oc), kdp_cohort_module_params(nc),
                     n * sizeof(float)) == 0);
    kdp_cohort_free(oc);
    kdp_cohort_free(nc);
  }
}
END_TEST

/* A module whose input columns are the peers' feature blocks (ffl's fusion head, pcl's ensemble
   teacher): weight (rows x D) keeps the kept peers' column blocks in their new places, a new
   peer's are a fresh module's; the tensor `whole` does not depend on the peers and is kept. */
static void check_columns(kdp_method m, const char *weight, size_t rows, size_t fusion,
                          const char *whole) {
  size_t od[] = {4, 6, 5}, nd[] = {5, 4, 7};
  int map[] = {2, 0, -1};
  kdp_cohort *oc = make(m, 3, od, fusion, 7), *nc = make(m, 3, nd, fusion, 9),
             *fresh = make(m, 3, nd, fusion, 9);
  number(oc);
  kdp_elastic_remap(oc, kdp_cohort_module_params(oc), nc, kdp_cohort_module_params(nc), map, 0,
                    NULL, 0);
  const float *op = kdp_cohort_module_params(oc), *np = kdp_cohort_module_params(nc),
              *fp = kdp_cohort_module_params(fresh);
  const kdp_kd_tensor *ow = tensor(oc, weight), *nw = tensor(nc, weight);
  ck_assert_ptr_nonnull(nw);
  size_t oD = 15, nD = 16;
  for (size_t h = 0; h < rows; h++)
    for (size_t j = 0; j < 3; j++)
      for (size_t c = 0; c < nd[j]; c++) {
        size_t at = nw->off + h * nD + feat_off(nd, j) + c;
        if (map[j] >= 0)
          ck_assert(np[at] == op[ow->off + h * oD + feat_off(od, (size_t)map[j]) + c]);
        else
          ck_assert(np[at] == fp[at]);
      }
  const kdp_kd_tensor *o2 = tensor(oc, whole), *n2 = tensor(nc, whole);
  ck_assert_ptr_nonnull(n2);
  ck_assert(memcmp(op + o2->off, np + n2->off, n2->size * sizeof(float)) == 0);
  kdp_cohort_free(oc);
  kdp_cohort_free(nc);
  kdp_cohort_free(fresh);
}

START_TEST(test_ffl_columns) {
  /* ffl's fusion head: fc1's input columns are the peers' feature blocks; its outputs (fixed
     kd.fusion_dim) and fc2 do not depend on the peers and are kept whole */
  check_columns(KDP_METHOD_FFL, "fusion.fc1.weight", 8, 8, "fusion.fc2.weight");
}
END_TEST

START_TEST(test_pcl_columns) {
  /* pcl's ensemble teacher: ens.weight's input columns are the peers' feature blocks, one row per
     class; ens.bias is kept whole */
  check_columns(KDP_METHOD_PCL, "ens.weight", 5, 0, "ens.bias");
}
END_TEST

START_TEST(test_okddip_owned) {
  /* okddip 4 -> 3 keeping 0, 2, 3: the leader is the last (old 3, new 2); new auxiliary peer 1
     is old peer 2, whose projections move from att.2.* to att.1.* */
  size_t od[] = {16, 16, 16, 16}, nd[] = {16, 16, 16};
  int map[] = {0, 2, 3};
  kdp_cohort *oc = make(KDP_METHOD_OKDDIP, 4, od, 0, 7), *nc = make(KDP_METHOD_OKDDIP, 3, nd, 0, 9);
  number(oc);
  kdp_elastic_remap(oc, kdp_cohort_module_params(oc), nc, kdp_cohort_module_params(nc), map, 0,
                    NULL, 0);
  const float *op = kdp_cohort_module_params(oc), *np = kdp_cohort_module_params(nc);
  const char *names[][2] = {{"att.0.query.weight", "att.0.query.weight"},
                            {"att.1.key.weight", "att.2.key.weight"},
                            {"att.1.query.weight", "att.2.query.weight"}};
  for (size_t i = 0; i < 3; i++) {
    const kdp_kd_tensor *n = tensor(nc, names[i][0]), *o = tensor(oc, names[i][1]);
    ck_assert_ptr_nonnull(n);
    ck_assert_ptr_nonnull(o);
    ck_assert(memcmp(op + o->off, np + n->off, n->size * sizeof(float)) == 0);
  }
  kdp_cohort_free(oc);
  kdp_cohort_free(nc);
}
END_TEST

static Suite *suite(void) {
  Suite *s = suite_create("elastic");
  TCase *tc = kdp_test_case("remap");
  tcase_add_test(tc, test_one_shrink);
  tcase_add_test(tc, test_one_shrink_reordered);
  tcase_add_test(tc, test_one_grow);
  tcase_add_test(tc, test_identity);
  tcase_add_test(tc, test_ffl_columns);
  tcase_add_test(tc, test_okddip_owned);
  tcase_add_test(tc, test_pcl_columns);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
