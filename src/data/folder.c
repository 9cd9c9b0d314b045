/* folder.c: an image folder (ROOT/CLASS/IMAGE.png, like torchvision's ImageFolder) as a dataset:
   classes from the sub-directory names, PNG decoded by libpng's simplified API. */
#include "kdpeers/data.h"

#include <dirent.h>
#include <errno.h>
#include <png.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define FOLDER_MAX_CLASSES 256
#define FOLDER_MAX_SIDE 16384u

typedef struct name_list {
  char **v;
  size_t n, cap;
} name_list;

static void list_add(name_list *l, const char *s) {
  if (l->n == l->cap) {
    l->cap = l->cap ? 2 * l->cap : 64;
    l->v = kdp_xrealloc(l->v, l->cap * sizeof *l->v);
  }
  l->v[l->n] = kdp_xstrdup(s);
  l->n++;
}

static void list_free(name_list *l) {
  for (size_t i = 0; i < l->n; i++) free(l->v[i]);
  free(l->v);
  memset(l, 0, sizeof *l);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int has_ext(const char *name, const char *ext) {
  size_t n = strlen(name), e = strlen(ext);
  return n > e && strcasecmp(name + n - e, ext) == 0;
}

/* Entries of dir (hidden ones skipped), sorted: sub-directories (want_dirs) or .png files; counts
   other files in *others. */
static int list_dir(const char *dir, int want_dirs, name_list *out, size_t *others,
                    kdp_error *err) {
  DIR *d = opendir(dir);
  if (!d) return kdp_fail(err, KDP_EIO, "cannot open image folder %s: %s", dir, strerror(errno));
  struct dirent *e;
  char path[4096];
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    int sub = is_dir(path);
    if (want_dirs && sub)
      list_add(out, e->d_name);
    else if (!want_dirs && !sub && has_ext(e->d_name, ".png"))
      list_add(out, e->d_name);
    else if (others)
      (*others)++;
  }
  closedir(d);
  if (out->n > 1) qsort(out->v, out->n, sizeof *out->v, cmp_str);
  return 0;
}

/* index of name in the "a\nb\n" list, or -1 */
static int class_index(const char *classes, const char *name) {
  int i = 0;
  size_t n = strlen(name);
  for (const char *p = classes; *p; i++) {
    const char *nl = strchr(p, '\n');
    size_t len = nl ? (size_t)(nl - p) : strlen(p);
    if (len == n && memcmp(p, name, n) == 0) return i;
    if (!nl) break;
    p = nl + 1;
  }
  return -1;
}

/* reads a PNG's header into im (libpng's simplified API) */
static int png_begin(png_image *im, const char *path, kdp_error *err) {
  memset(im, 0, sizeof *im);
  im->version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(im, path))
    return kdp_fail(err, KDP_EFORMAT, "%s: not a readable PNG: %s", path, im->message);
  return 0;
}

int kdp_png_read(const char *path, size_t H, size_t W, size_t C, uint8_t *out, kdp_error *err) {
  png_image im;
  int rc = png_begin(&im, path, err);
  if (rc) return rc;
  if (im.height != H || im.width != W) {
    rc = kdp_fail(err, KDP_EINVAL, "%s is %ux%u pixels, the model takes %zux%zu", path, im.width,
                  im.height, W, H);
    png_image_free(&im);
    return rc;
  }
  /* 8-bit gray or RGB: 16-bit samples are scaled, palettes expanded, alpha composited onto
     black by libpng (with a NULL background it would composite onto whatever out held) */
  im.format = C == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  png_color black = {0, 0, 0};
  if (!png_image_finish_read(&im, &black, out, 0, NULL)) {
    rc = kdp_fail(err, KDP_EFORMAT, "%s: cannot decode the PNG: %s", path, im.message);
    png_image_free(&im);
  }
  return rc;
}

int kdp_class_name_ok(const char *s, size_t len) {
  if (len == 0 || len >= KDP_MAX_CLASS_NAME) return 0;
  for (size_t k = 0; k < len; k++)
    if ((unsigned char)s[k] < 0x20 || s[k] == 0x7f || s[k] == '"') return 0;
  return 1;
}

typedef struct folder_item {
  char *path;
  uint8_t label;
} folder_item;

int kdp_folder_load(kdp_dataset *ds, const char *root, const char *classes, kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  if (!root || !*root)
    return kdp_fail(err, KDP_EINVAL, "image folder dataset needs a directory (data.*_images)");
  if (!is_dir(root))
    return kdp_fail(err, KDP_EIO,
                    "image folder %s is not a directory (data.format = folder reads "
                    "ROOT/CLASS/IMAGE.png)",
                    root);
  name_list dirs = {0};
  size_t stray = 0;
  int rc = list_dir(root, 1, &dirs, &stray, err);
  if (rc) return rc;
  if (dirs.n == 0) {
    list_free(&dirs);
    return kdp_fail(err, KDP_EFORMAT,
                    "image folder %s has no class sub-directories: expected ROOT/CLASS/IMAGE.png, "
                    "one sub-directory per class",
                    root);
  }
  if (!classes && (dirs.n > FOLDER_MAX_CLASSES || dirs.n < 2)) {
    size_t n = dirs.n;
    list_free(&dirs);
    return kdp_fail(err, KDP_EFORMAT, "image folder %s has %zu class sub-director%s: expected 2..%d",
                    root, n, n == 1 ? "y" : "ies", FOLDER_MAX_CLASSES);
  }
  /* every image of every class, in class order then file-name order */
  folder_item *items = NULL;
  size_t n = 0, cap = 0, n_classes = classes ? 0 : dirs.n;
  char path[4096];
  for (size_t c = 0; c < dirs.n && rc == 0; c++) {
    int label = (int)c;
    if (classes) {
      label = class_index(classes, dirs.v[c]);
      if (label < 0) {
        rc = kdp_fail(err, KDP_EFORMAT,
                      "image folder %s: class '%s' is not one of the training folder's classes "
                      "(%s)",
                      root, dirs.v[c], "every test class needs a training sub-directory of the same name");
        break;
      }
      if ((size_t)label + 1 > n_classes) n_classes = (size_t)label + 1;
    }
    if (!kdp_class_name_ok(dirs.v[c], strlen(dirs.v[c]))) {
      rc = kdp_fail(err, KDP_EFORMAT,
                    "image folder %s: class directory '%.80s' cannot name a class: a class name "
                    "is 1..%d bytes without control characters or '\"' (it goes into the model "
                    "file); rename the directory",
                    root, dirs.v[c], KDP_MAX_CLASS_NAME - 1);
      break;
    }
    snprintf(path, sizeof path, "%s/%s", root, dirs.v[c]);
    name_list files = {0};
    size_t others = 0;
    rc = list_dir(path, 0, &files, &others, err);
    if (rc == 0 && files.n == 0)
      rc = kdp_fail(err, KDP_EFORMAT,
                    "image folder %s: class directory '%s' holds no .png files%s", root, dirs.v[c],
                    others ? " (only other files: kdpeers decodes PNG; convert the images, e.g. "
                             "with ImageMagick's mogrify -format png)"
                           : "");
    for (size_t i = 0; rc == 0 && i < files.n; i++) {
      if (n == cap) {
        cap = cap ? 2 * cap : 1024;
        items = kdp_xrealloc(items, cap * sizeof *items);
      }
      char fp[8192];
      snprintf(fp, sizeof fp, "%s/%s", path, files.v[i]);
      items[n].path = kdp_xstrdup(fp);
      items[n++].label = (uint8_t)label;
    }
    list_free(&files);
  }
  /* the class names: this folder's (training), or the given list (test) */
  char *names = NULL;
  if (rc == 0) {
    if (classes) {
      names = strdup(classes);
    } else {
      size_t len = 1;
      for (size_t c = 0; c < dirs.n; c++) len += strlen(dirs.v[c]) + 1;
      names = kdp_xmalloc(len);
      names[0] = 0;
      for (size_t c = 0; c < dirs.n; c++) {
        strcat(names, dirs.v[c]);
        strcat(names, "\n");
      }
    }
  }
  list_free(&dirs);
  /* pass 1: headers (size and colour); pass 2: decode */
  size_t H = 0, W = 0, C = 1;
  for (size_t i = 0; rc == 0 && i < n; i++) {
    png_image im;
    if ((rc = png_begin(&im, items[i].path, err)) != 0) break;
    if (i == 0) {
      H = im.height;
      W = im.width;
    }
    if (im.format & PNG_FORMAT_FLAG_COLOR) C = 3;
    size_t h = im.height, w = im.width;
    png_image_free(&im);
    if (h == 0 || w == 0 || h > FOLDER_MAX_SIDE || w > FOLDER_MAX_SIDE)
      rc = kdp_fail(err, KDP_EFORMAT, "%s: image of %zux%zu pixels: expected 1..%u per side",
                    items[i].path, w, h, FOLDER_MAX_SIDE);
    else if (h != H || w != W)
      rc = kdp_fail(err, KDP_EFORMAT,
                    "%s is %zux%zu pixels but %s is %zux%zu: every image of a folder dataset "
                    "must have the same size (resize them first)",
                    items[i].path, w, h, items[0].path, W, H);
  }
  uint8_t *pix = NULL, *lab = NULL;
  size_t isz = H * W * C;
  if (rc == 0) {
    pix = malloc(n * isz);
    lab = kdp_xmalloc(n);
    if (!pix)
      rc = kdp_fail(err, KDP_ENOMEM, "image folder %s: cannot allocate %zu bytes for %zu images",
                    root, n * isz, n);
  }
  for (size_t i = 0; rc == 0 && i < n; i++) {
    rc = kdp_png_read(items[i].path, H, W, C, pix + i * isz, err);
    lab[i] = items[i].label;
  }
  for (size_t i = 0; i < n; i++) free(items[i].path);
  free(items);
  if (rc) {
    free(pix);
    free(lab);
    free(names);
    return rc;
  }
  ds->n = n;
  ds->H = H;
  ds->W = W;
  ds->C = C;
  ds->n_classes = n_classes < 2 ? 2 : n_classes;
  if (classes) { /* the training list fixes the class count */
    size_t k = 0;
    for (const char *p = classes; *p; p++) k += *p == '\n';
    if (k > ds->n_classes) ds->n_classes = k;
  }
  ds->images = pix;
  ds->labels = lab;
  ds->elem = 1;
  ds->owns = 1;
  ds->class_names = names;
  return 0;
}
