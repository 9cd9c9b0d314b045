/* embed.c: a build-time tool: writes a C file that holds the dashboard's files (its page, script
   and style, and Debian's Chart.js) as byte arrays, with kdp_asset_find() to look them up by URL
   path, so kdpeers serves them with no files to install next to it.
   Usage: kdp-embed OUT.c URL CONTENT-TYPE FILE [URL CONTENT-TYPE FILE]... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int embed(FILE *out, int i, const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return -1;
  }
  fprintf(out, "static const unsigned char a%d[] = {", i);
  unsigned char buf[4096];
  size_t n, total = 0;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
    for (size_t k = 0; k < n; k++, total++)
      fprintf(out, "%s%u,", total % 24 ? "" : "\n", (unsigned)buf[k]);
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    perror(path);
    return -1;
  }
  if (total == 0) fputs("0", out); /* an empty file: one unused byte, length 0 */
  fputs("};\n", out);
  *len = total;
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 5 || (argc - 2) % 3 != 0) {
    fprintf(stderr, "usage: %s OUT.c URL CONTENT-TYPE FILE [URL CONTENT-TYPE FILE]...\n", argv[0]);
    return 2;
  }
  FILE *out = fopen(argv[1], "w");
  if (!out) {
    perror(argv[1]);
    return 1;
  }
  int n = (argc - 2) / 3;
  size_t *lens = calloc((size_t)n, sizeof *lens);
  fputs("/* generated at build time by src/serve/embed.c: do not edit */\n"
        "#include <string.h>\n\n#include \"serve_internal.h\"\n\n",
        out);
  for (int i = 0; i < n; i++) {
    if (!lens || embed(out, i, argv[2 + 3 * i + 2], &lens[i]) != 0) {
      free(lens);
      fclose(out);
      remove(argv[1]);
      return 1;
    }
  }
  fputs("\nstatic const kdp_asset assets[] = {\n", out);
  for (int i = 0; i < n; i++)
    fprintf(out, "    {\"%s\", \"%s\", a%d, %zu},\n", argv[2 + 3 * i], argv[2 + 3 * i + 1], i,
            lens[i]);
  free(lens);
  fputs("};\n\n"
        "const kdp_asset *kdp_asset_find(const char *path, size_t len) {\n"
        "  for (size_t i = 0; i < sizeof assets / sizeof assets[0]; i++)\n"
        "    if (strlen(assets[i].path) == len && memcmp(assets[i].path, path, len) == 0)\n"
        "      return &assets[i];\n"
        "  return NULL;\n"
        "}\n",
        out);
  if (fclose(out) != 0) {
    perror(argv[1]);
    return 1;
  }
  return 0;
}
