/*
 * mailgate's XOAUTH2 client mechanism for Cyrus SASL, for Postfix's SMTP client.
 *
 * XOAUTH2 (Gmail, Microsoft 365) sends one initial response:
 *     "user=" account "\001auth=Bearer " access-token "\001\001"
 * The account is the SASL authentication name and the access token the SASL password, both
 * from Postfix's smtp_sasl_password_maps, where mailgate's socketmap answers
 * "account:current-access-token". Postfix hands the password through a "secret" callback
 * (sasl_getsecret_t); a plugin that asks for it as a plain string gets SASL_BADPARAM
 * ("invalid parameter supplied"), which is why this one exists.
 *
 * A refused token is answered with a 334 challenge holding the provider's error; the reply to
 * it is empty, and the server's 535 that follows ends the exchange.
 */

#include <stdio.h>
#include <string.h>

#include <sasl/sasl.h>
#include <sasl/saslplug.h>

typedef struct {
    int step;
    char *out;
    unsigned out_len;
} xoauth2_context;

static int xoauth2_new(void *glob_context, sasl_client_params_t *params, void **conn_context)
{
    xoauth2_context *context;

    (void)glob_context;
    context = params->utils->malloc(sizeof(*context));
    if (context == NULL)
        return SASL_NOMEM;
    memset(context, 0, sizeof(*context));
    *conn_context = context;
    return SASL_OK;
}

/* The authentication name, from the application's simple callback. */
static int get_authname(const sasl_utils_t *utils, const char **authname)
{
    sasl_getsimple_t *getsimple = NULL;
    void *callback_context = NULL;
    unsigned length = 0;

    if (utils->getcallback(utils->conn, SASL_CB_AUTHNAME, (sasl_callback_ft *)&getsimple,
                           &callback_context) != SASL_OK || getsimple == NULL)
        return SASL_BADPARAM;
    return getsimple(callback_context, SASL_CB_AUTHNAME, authname, &length);
}

/* The password (the access token), from the application's secret callback. */
static int get_token(const sasl_utils_t *utils, sasl_secret_t **token)
{
    sasl_getsecret_t *getsecret = NULL;
    void *callback_context = NULL;

    if (utils->getcallback(utils->conn, SASL_CB_PASS, (sasl_callback_ft *)&getsecret,
                           &callback_context) != SASL_OK || getsecret == NULL)
        return SASL_BADPARAM;
    return getsecret(utils->conn, callback_context, SASL_CB_PASS, token);
}

static int initial_response(xoauth2_context *context, sasl_client_params_t *params,
                            const char **clientout, unsigned *clientoutlen, sasl_out_params_t *oparams)
{
    const sasl_utils_t *utils = params->utils;
    const char *authname = NULL;
    sasl_secret_t *token = NULL;
    unsigned needed;
    int result;

    if (params->props.min_ssf > params->external_ssf) {
        utils->seterror(utils->conn, 0, "XOAUTH2 offers no security layer of its own");
        return SASL_TOOWEAK;
    }
    result = get_authname(utils, &authname);
    if (result != SASL_OK || authname == NULL || *authname == '\0')
        return result != SASL_OK ? result : SASL_BADPARAM;
    result = get_token(utils, &token);
    if (result != SASL_OK || token == NULL || token->len == 0)
        return result != SASL_OK ? result : SASL_BADPARAM;
    result = params->canon_user(utils->conn, authname, 0, SASL_CU_AUTHID | SASL_CU_AUTHZID, oparams);
    if (result != SASL_OK)
        return result;

    needed = 5 + strlen(authname) + 13 + token->len + 2;
    context->out = utils->malloc(needed + 1);
    if (context->out == NULL)
        return SASL_NOMEM;
    snprintf(context->out, needed + 1, "user=%s\001auth=Bearer %.*s\001\001",
             authname, (int)token->len, (const char *)token->data);
    context->out_len = needed;
    *clientout = context->out;
    *clientoutlen = context->out_len;
    return SASL_CONTINUE;
}

static int xoauth2_step(void *conn_context, sasl_client_params_t *params, const char *serverin,
                        unsigned serverinlen, sasl_interact_t **prompt_need, const char **clientout,
                        unsigned *clientoutlen, sasl_out_params_t *oparams)
{
    xoauth2_context *context = conn_context;

    (void)serverin;
    (void)serverinlen;
    (void)prompt_need;
    *clientout = NULL;
    *clientoutlen = 0;
    if (context->step++ == 0)
        return initial_response(context, params, clientout, clientoutlen, oparams);
    /* The server's error challenge: answer empty, the server then refuses with 535. */
    *clientout = "";
    oparams->doneflag = 1;
    oparams->mech_ssf = 0;
    oparams->maxoutbuf = 0;
    oparams->encode = NULL;
    oparams->decode = NULL;
    oparams->param_version = 0;
    return SASL_OK;
}

static void xoauth2_dispose(void *conn_context, const sasl_utils_t *utils)
{
    xoauth2_context *context = conn_context;

    if (context == NULL)
        return;
    if (context->out != NULL) {
        memset(context->out, 0, context->out_len);
        utils->free(context->out);
    }
    utils->free(context);
}

static sasl_client_plug_t xoauth2_plugins[] = {{
    "XOAUTH2",
    0,
    SASL_SEC_NOANONYMOUS | SASL_SEC_PASS_CREDENTIALS,
    SASL_FEAT_WANT_CLIENT_FIRST | SASL_FEAT_ALLOWS_PROXY,
    NULL, NULL,
    xoauth2_new, xoauth2_step, xoauth2_dispose,
    NULL, NULL, NULL, NULL
}};

int sasl_client_plug_init(const sasl_utils_t *utils, int maxversion, int *out_version,
                          sasl_client_plug_t **pluglist, int *plugcount)
{
    if (maxversion < SASL_CLIENT_PLUG_VERSION) {
        utils->seterror(utils->conn, 0, "XOAUTH2: SASL client plugin version too old");
        return SASL_BADVERS;
    }
    *out_version = SASL_CLIENT_PLUG_VERSION;
    *pluglist = xoauth2_plugins;
    *plugcount = 1;
    return SASL_OK;
}
